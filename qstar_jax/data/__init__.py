"""qstar_jax.data: data locations, GSM8K, tiny Shakespeare, tfds builders, grain pipelines.

``tfds_builders`` (tensorflow-datasets) is imported on use, not here.
"""

from qstar_jax.data.gsm8k import DataChecksumError, load_gsm8k, parse_gsm8k_answer, strip_calculator
from qstar_jax.data.paths import cache_dir, data_dir, data_file
from qstar_jax.data.pipeline import (
  batch_at,
  batch_indices,
  iterate_batches,
  pack_documents,
  pack_tokens,
  read_gsm8k_split,
  read_tiny_shakespeare_splits,
)
from qstar_jax.data.text import load_tiny_shakespeare, split_text

__all__ = [
  "DataChecksumError",
  "batch_at",
  "batch_indices",
  "cache_dir",
  "data_dir",
  "data_file",
  "iterate_batches",
  "load_gsm8k",
  "load_tiny_shakespeare",
  "pack_documents",
  "pack_tokens",
  "parse_gsm8k_answer",
  "read_gsm8k_split",
  "read_tiny_shakespeare_splits",
  "split_text",
  "strip_calculator",
]
