"""qstar_jax.envs."""

__all__: list[str] = []
