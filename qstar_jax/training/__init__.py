"""qstar_jax.training."""

__all__: list[str] = []
