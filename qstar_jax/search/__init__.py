"""qstar_jax.search."""

__all__: list[str] = []
