"""Pallas kernels of qstar_jax, each beside the plain-jnp reference that specifies it.

Installed as ``qstar_jax.kernels`` (the folder sits at the repository top level). Import it as
``from qstar_jax import kernels`` — never as a top-level ``kernels`` module.
"""
