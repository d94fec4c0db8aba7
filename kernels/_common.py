"""Shared helpers of the Pallas kernels: backend choice, interpret mode, padding, checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
  "resolve_interpret",
  "resolve_backend",
  "compiler_params",
  "pad_to",
  "round_up",
  "check_block",
  "check_dtype",
]


def resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret mode exactly when the default backend is the CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def resolve_backend(interpret: bool | None) -> str:
  """"interpret" (CPU, or asked for), "triton" on GPUs, "mosaic" on TPUs."""
  if resolve_interpret(interpret):
    return "interpret"
  return "triton" if jax.default_backend() == "gpu" else "mosaic"


def compiler_params(backend: str, *, num_warps: int = 4, num_stages: int = 3):
  """Compiler params per Pallas backend: Triton's on GPUs (selects Triton, not Mosaic GPU),
  None in interpret mode and on TPU (Mosaic defaults)."""
  if backend == "triton":
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return None


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads x at the end of each axis up to `shape` (no-op when already that shape)."""
  if tuple(x.shape) == tuple(shape):
    return x
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape, strict=True)])


def check_block(name: str, value: int, *, minimum: int = 1) -> None:
  """Block sizes must be powers of two (Triton tiles) and at least `minimum` (tl.dot: 16)."""
  if not isinstance(value, int) or value < minimum or value & (value - 1):
    raise ValueError(f"{name}={value!r}: expected a power of two >= {minimum}")


def check_dtype(name: str, x: jax.Array, allowed: tuple) -> None:
  allowed_dtypes = tuple(jnp.dtype(d) for d in allowed)
  if jnp.dtype(x.dtype) not in allowed_dtypes:
    names = ", ".join(d.name for d in allowed_dtypes)
    raise TypeError(f"{name} has dtype {jnp.dtype(x.dtype).name}: expected one of {names}")
