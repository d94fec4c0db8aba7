"""qstar_jax.losses."""

__all__: list[str] = []
