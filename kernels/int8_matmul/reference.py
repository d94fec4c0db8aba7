"""Specification of the W8A8 matmul: int8 x int8 -> exact int32, scales in the epilogue."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["int8_matmul_reference"]


def int8_matmul_reference(
  x: jax.Array,
  w: jax.Array,
  x_scale: jax.Array | None = None,
  w_scale: jax.Array | None = None,
  *,
  half_offset: bool = False,
  out_dtype=jnp.float32,
) -> jax.Array:
  """`acc = x @ w` in int32 (exact), then `acc * x_scale[:, None] * w_scale[None, :]`.

  Args:
    x: int8 [M, K] activation codes.
    w: int8 [K, N] weight codes.
    x_scale: float32 [M] per-row scale, w_scale: float32 [N] per-column scale; both None for
      the raw int32 result.
    half_offset: the codes stand for the zero-free grid values `c + 1/2`: then
      `acc = sum_k (2 x_mk + 1)(2 w_kn + 1) = 4 x@w + 2 rowsum(x)_m + 2 colsum(w)_n + K`
      (exact int32; the caller folds the factor 1/4 into the scales).

  Returns:
    int32 [M, N] without scales, else out_dtype [M, N].
  """
  xi = x.astype(jnp.int32)
  wi = w.astype(jnp.int32)
  acc = jnp.dot(xi, wi, preferred_element_type=jnp.int32)
  if half_offset:
    k = x.shape[1]
    acc = 4 * acc + 2 * xi.sum(axis=1, keepdims=True) + 2 * wi.sum(axis=0, keepdims=True) + k
  if x_scale is None and w_scale is None:
    return acc
  out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None]
  out = out * w_scale.astype(jnp.float32)[None, :]
  return out.astype(out_dtype)
