"""qstar_jax.data: data locations, GSM8K, tiny Shakespeare, tfds builders, grain pipelines."""

from qstar_jax.data.paths import cache_dir, data_dir, data_file

__all__ = ["cache_dir", "data_dir", "data_file"]
