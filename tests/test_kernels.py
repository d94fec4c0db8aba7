"""Pallas kernels vs their jnp references (interpret mode on CPU), padding, refusals, Triton
lowering, and the quantized_matmul dispatcher."""

import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.kernels import (
  hadamard_quantize,
  hadamard_quantize_reference,
  int4_matmul,
  int4_matmul_reference,
  int8_matmul,
  int8_matmul_reference,
  pack_int4,
  quantize_weight,
  quantized_matmul,
  unpack_int4,
)
from qstar_jax.kernels.hadamard_quantize import dequantize_codes
from qstar_jax.quant import QuantConfig, fake_quant_dense


def _int8(rng, shape):
  return jnp.asarray(rng.integers(-128, 128, shape), jnp.int8)


# ------------------------------------------------------------------------------------ W8A8


# (M, K, N): tiled, padded in every dimension, decode-like.
INT8_SHAPES = [(32, 64, 32), (37, 80, 19), (3, 128, 64)]


@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_matmul_exact_int32(m, k, n):
  rng = np.random.default_rng(m * 1000 + k + n)
  x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
  out = int8_matmul(x, w, block_m=16, block_n=16, block_k=32)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(int8_matmul_reference(x, w)))
  # The reference itself is the exact integer product.
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(x, np.int64) @ np.asarray(w, np.int64))
  out = int8_matmul(x, w, half_offset=True, block_m=16, block_n=16, block_k=32)
  odd = (2 * np.asarray(x, np.int64) + 1) @ (2 * np.asarray(w, np.int64) + 1)
  np.testing.assert_array_equal(np.asarray(out), odd)


@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_int8_matmul_scaled_epilogue(m, k, n):
  rng = np.random.default_rng(m + k * n)
  x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
  xs = jnp.asarray(rng.uniform(0.01, 1, m), jnp.float32)
  ws = jnp.asarray(rng.uniform(0.01, 1, n), jnp.float32)
  half = m % 2 == 1  # both epilogues covered across the shapes
  out = int8_matmul(x, w, xs, ws, half_offset=half, block_m=16, block_n=16, block_k=32)
  ref = int8_matmul_reference(x, w, xs, ws, half_offset=half)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6)


@pytest.mark.parametrize("m,k,n,group_m", [(32, 64, 32, None), (37, 80, 19, 2), (70, 96, 50, 3)])
def test_int8_matmul_nk_layout_and_grouped_order(m, k, n, group_m):
  """w given as [N, K] and/or programs in grouped order: the same exact integer product."""
  rng = np.random.default_rng(m * 31 + k + n)
  x, w = _int8(rng, (m, k)), _int8(rng, (k, n))
  xi, wi = np.asarray(x, np.int64), np.asarray(w, np.int64)
  w_nk = jnp.asarray(np.ascontiguousarray(np.asarray(w).T))
  for layout, weight in (("nk", w_nk), ("kn", w)):
    out = int8_matmul(x, weight, block_m=16, block_n=16, block_k=32, w_layout=layout,
                      group_m=group_m)
    np.testing.assert_array_equal(np.asarray(out), xi @ wi)
  out = int8_matmul(x, w_nk, half_offset=True, block_m=16, block_n=16, block_k=32,
                    w_layout="nk", group_m=group_m)
  np.testing.assert_array_equal(np.asarray(out), (2 * xi + 1) @ (2 * wi + 1))


def test_int8_matmul_errors():
  x, w = jnp.ones((4, 32), jnp.int8), jnp.ones((32, 8), jnp.int8)
  with pytest.raises(TypeError, match="int8"):
    int8_matmul(x.astype(jnp.float32), w)
  with pytest.raises(ValueError, match="expected \\[32, N\\]"):
    int8_matmul(x, jnp.ones((16, 8), jnp.int8))
  with pytest.raises(ValueError, match="x_scale has shape \\(3,\\)"):
    int8_matmul(x, w, jnp.ones(3), jnp.ones(8))
  with pytest.raises(ValueError, match="w_scale"):
    int8_matmul(x, w, jnp.ones(4), jnp.ones((8, 1)))
  with pytest.raises(ValueError, match="both"):
    int8_matmul(x, w, jnp.ones(4), None)
  with pytest.raises(ValueError, match="block_k=24"):
    int8_matmul(x, w, block_k=24)
  with pytest.raises(ValueError, match="expected \\[N, 32\\]"):
    int8_matmul(x, w, w_layout="nk")  # w is [K, N]: K sits on the wrong axis
  with pytest.raises(ValueError, match="w_layout='tn'"):
    int8_matmul(x, w, w_layout="tn")
  with pytest.raises(ValueError, match="group_m=0"):
    int8_matmul(x, w, group_m=0)


# ----------------------------------------------------------------------------------- W4A16


def test_pack_unpack_int4_roundtrip():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.integers(-8, 8, (10, 7)), jnp.int8)
  packed = pack_int4(q)
  assert packed.shape == (5, 7) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), np.asarray(q))
  # Byte layout: low nibble row i, high nibble row i + K/2 (two's complement).
  b = int(np.asarray(packed)[1, 2]) & 0xFF
  lo, hi = b & 0xF, b >> 4
  assert (lo - 16 if lo > 7 else lo) == int(q[1, 2])
  assert (hi - 16 if hi > 7 else hi) == int(q[6, 2])


# (M, K, N, groups): decode (M=1), per-channel, grouped with padding in M and N, prefill-like.
INT4_SHAPES = [(1, 128, 64, 1), (5, 64, 40, 2), (24, 96, 32, 3), (33, 64, 48, 1)]


@pytest.mark.parametrize("m,k,n,groups", INT4_SHAPES)
def test_int4_matmul_matches_reference(m, k, n, groups):
  rng = np.random.default_rng(m + 7 * k + n + groups)
  packed = pack_int4(jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8))
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (groups, n)), jnp.float32)
  # Alternate activation dtype and offset across the shapes (interpret mode is slow).
  dtype = jnp.bfloat16 if groups == 1 else jnp.float32
  half = m % 2 == 1
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  out = int4_matmul(x, packed, scale, half_offset=half, block_n=16, block_k=32)
  ref = int4_matmul_reference(x, packed, scale, half_offset=half)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-6,
                             atol=2e-6 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("m,k,groups,split_k", [(1, 256, 1, 4), (16, 512, 4, 2), (3, 128, 2, 2)])
def test_int4_matmul_split_k(m, k, groups, split_k):
  """Split-K partial sums add up to the reference, with group scales inside the chunks."""
  n = 48
  rng = np.random.default_rng(m + k + split_k)
  packed = pack_int4(jnp.asarray(rng.integers(-8, 8, (k, n)), jnp.int8))
  scale = jnp.asarray(rng.uniform(0.01, 0.1, (groups, n)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  ref = int4_matmul_reference(x, packed, scale, half_offset=True)
  out = int4_matmul(x, packed, scale, half_offset=True, block_n=16, block_k=32, split_k=split_k)
  assert out.shape == (m, n)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-6,
                             atol=2e-6 * float(jnp.abs(ref).max()))


def test_int4_matmul_errors():
  packed = jnp.ones((32, 16), jnp.int8)
  x = jnp.ones((2, 64), jnp.float32)
  with pytest.raises(ValueError, match="odd"):
    pack_int4(jnp.ones((7, 4), jnp.int8))
  with pytest.raises(ValueError, match="odd"):
    int4_matmul(jnp.ones((2, 63)), packed, jnp.ones((1, 16)))
  with pytest.raises(ValueError, match="expected K/2=16"):
    int4_matmul(jnp.ones((2, 32)), packed, jnp.ones((1, 16)))
  with pytest.raises(ValueError, match="scale has shape \\(1, 8\\)"):
    int4_matmul(x, packed, jnp.ones((1, 8)))
  with pytest.raises(ValueError, match="G dividing K=64"):
    int4_matmul(x, packed, jnp.ones((3, 16)))
  with pytest.raises(ValueError, match="does not tile"):  # K/2 = 20: no 16-row tiles
    int4_matmul(jnp.ones((2, 40)), jnp.ones((20, 16), jnp.int8), jnp.ones((1, 16)))
  with pytest.raises(TypeError, match="int8"):
    int4_matmul(x, packed.astype(jnp.uint8), jnp.ones((1, 16)))
  with pytest.raises(ValueError, match="split_k=3"):
    int4_matmul(x, packed, jnp.ones((1, 16)), split_k=3)
  with pytest.raises(ValueError, match="split_k=4\\) does not tile"):  # K/2 = 32: 8-row chunks
    int4_matmul(x, packed, jnp.ones((1, 16)), split_k=4)


# ---------------------------------------------------------------------- Hadamard + quantize


def _boundary_distance(x, bits, block):
  """Distance of clip(x_h)/D + 1 to the nearest integer (where floor may flip)."""
  from qstar_jax.quant import gaussian_mse_scale, hadamard

  x_h = np.asarray(hadamard(jnp.asarray(x, jnp.float32), block, method="matmul"), np.float64)
  sigma = np.sqrt(np.mean(x_h**2, axis=-1, keepdims=True))
  s = gaussian_mse_scale(bits) * sigma
  v = np.clip(x_h, -s, s) / (2 * s / (2**bits - 1)) + 1
  return np.abs(v - np.round(v))


# (M, K, Hadamard block, bits)
HQ_SHAPES = [(16, 64, 32, 4), (5, 256, 128, 1), (33, 96, 32, 8), (20, 128, 64, 2)]


@pytest.mark.parametrize("m,k,block,bits", HQ_SHAPES)
def test_hadamard_quantize_matches_reference(m, k, block, bits):
  rng = np.random.default_rng(m * k + bits)
  x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.5, 3, (m, 1)), jnp.float32)
  codes, step = hadamard_quantize(x, bits, block=block)
  ref_codes, ref_step = hadamard_quantize_reference(x, bits, block=block)
  assert codes.dtype == jnp.int8 and step.shape == (m,)
  np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), rtol=1e-6)
  diff = np.asarray(codes) != np.asarray(ref_codes)
  # Codes agree exactly except where the value sits within float rounding of a level boundary
  # (the kernel sums sigma^2 per Hadamard block, the reference in one reduction).
  assert not np.any(diff & (_boundary_distance(x, bits, block) > 1e-4))
  assert diff.mean() < 1e-3
  assert np.asarray(codes).min() >= -(2 ** (bits - 1)) and np.asarray(codes).max() < 2 ** (bits - 1)


def test_hadamard_quantize_bf16_input_and_dequantized_values():
  from qstar_jax.quant import grid_quantize, hadamard

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
  codes, step = hadamard_quantize(x, 3, block=64)
  q, _, _ = grid_quantize(hadamard(x.astype(jnp.float32), 64, method="matmul"), 3)
  np.testing.assert_allclose(np.asarray(dequantize_codes(codes, step)), np.asarray(q),
                             rtol=1e-6, atol=1e-6)


def test_hadamard_quantize_errors():
  with pytest.raises(ValueError, match="1..8"):
    hadamard_quantize(jnp.ones((2, 64)), 9)
  with pytest.raises(ValueError, match="power of two"):
    hadamard_quantize(jnp.ones((2, 96)), 4, block=48)
  with pytest.raises(ValueError, match="not a multiple"):
    hadamard_quantize(jnp.ones((2, 96)), 4, block=64)
  with pytest.raises(ValueError, match="< 16"):
    hadamard_quantize(jnp.ones((2, 64)), 4, block=8)
  with pytest.raises(TypeError, match="float32"):
    hadamard_quantize(jnp.ones((2, 64), jnp.int32), 4, block=32)


# ------------------------------------------------------------------------ Triton lowering


def test_kernels_lower_to_triton():
  """Each kernel lowers through Pallas' Triton backend (cross-platform lowering, no GPU)."""
  from qstar_jax.kernels.hadamard_quantize.kernel import hadamard_quantize_pallas
  from qstar_jax.kernels.int4_matmul.kernel import int4_matmul_pallas
  from qstar_jax.kernels.int8_matmul.kernel import int8_matmul_pallas

  i8 = jnp.ones((64, 128), jnp.int8)
  s = jnp.ones((64,), jnp.float32)
  lowered = [
    int8_matmul_pallas.trace(i8, i8.T, s, s, block_m=32, block_n=32, block_k=32, true_k=128,
                             half_offset=True, out_dtype=jnp.float32, backend="triton"),
    int8_matmul_pallas.trace(i8, i8, s, s, block_m=32, block_n=32, block_k=32, true_k=128,
                             half_offset=True, out_dtype=jnp.float32, backend="triton",
                             w_layout="nk", group_m=2),
    int4_matmul_pallas.trace(jnp.ones((16, 128), jnp.bfloat16), jnp.ones((64, 64), jnp.int8),
                             jnp.ones((2, 64)), block_m=16, block_n=32, block_k=32,
                             half_offset=True, backend="triton"),
    int4_matmul_pallas.trace(jnp.ones((16, 256), jnp.bfloat16), jnp.ones((128, 64), jnp.int8),
                             jnp.ones((2, 64)), block_m=16, block_n=32, block_k=32,
                             half_offset=True, backend="triton", split_k=4),
    hadamard_quantize_pallas.trace(jnp.ones((32, 256), jnp.bfloat16), jnp.ones((128, 128)),
                                   bits=4, block_m=16, backend="triton"),
  ]
  for traced in lowered:
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_int8_nk_layout_feeds_triton_dot_a_transposed_k_major_tile(capsys):
  """With w [N, K] the kernel loads K-contiguous [block_n, block_k] int8 tiles and transposes
  them into the dot (the K-major B operand of 8-bit tensor-core MMAs); with w [K, N] the dot
  takes the loaded [block_k, block_n] tile as it is. Read from Pallas' Triton IR (no GPU)."""
  from qstar_jax.kernels.int8_matmul.kernel import int8_matmul_pallas

  i8 = jnp.ones((128, 64), jnp.int8)
  s = jnp.ones((128,), jnp.float32)
  for layout in ("nk", "kn"):
    int8_matmul_pallas.trace(
      i8, i8 if layout == "nk" else i8.T, s, s, block_m=32, block_n=32, block_k=16, true_k=64,
      half_offset=False, out_dtype=jnp.float32, backend="triton", w_layout=layout,
      debug=True).lower(lowering_platforms=("cuda",))
    ir = capsys.readouterr().out
    assert "tt.dot" in ir and "tensor<32x16xi8> * tensor<16x32xi8> -> tensor<32x32xi32>" in ir
    has_trans = "tt.trans" in ir and "tensor<32x16xi8> -> tensor<16x32xi8>" in ir
    assert has_trans == (layout == "nk"), layout


# ----------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (8, 8), (4, None), (3, None), (None, 4)])
def test_quantized_matmul_matches_fake_quant(w_bits, a_bits):
  rng = np.random.default_rng(w_bits or 0)
  x = jnp.asarray(rng.standard_normal((2, 3, 128)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((128, 24)) / 11, jnp.float32)
  cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, hadamard_block=64)
  ref = fake_quant_dense(x, kernel, cfg)
  qw = quantize_weight(kernel, w_bits=w_bits, a_bits=a_bits, block=64)
  assert qw.packed == (w_bits == 4 and a_bits is None)
  out = quantized_matmul(x, qw, use_kernel=False)
  if w_bits is not None and a_bits is not None:
    # Integer path: same codes, exact integer products, same epilogue order: bit for bit.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  else:
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
  if qw.packed or (w_bits == 4 and a_bits == 4):  # Pallas kernels, interpret mode
    out_k = quantized_matmul(x, qw, use_kernel=True)
    np.testing.assert_allclose(np.asarray(out_k), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_quantized_matmul_errors():
  qw = quantize_weight(jnp.ones((64, 8)), w_bits=4, a_bits=4, block=64)
  with pytest.raises(ValueError, match="K=32"):
    quantized_matmul(jnp.ones((2, 32)), qw)
  with pytest.raises(ValueError, match="int4"):
    quantize_weight(jnp.ones((64, 8)), w_bits=8, a_bits=None, block=64, pack=True)
