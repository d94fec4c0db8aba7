"""The one QuEST grid (`quest_grid` / `QuestGrid`) and its one integer-code convention, checked
against hand computation and brute-force nearest-level search; every former copy (quantizers,
kernel reference, weight converter) agrees with it; `qstar_jax.quant` imports only math."""

from __future__ import annotations

import ast
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.kernels import (
  dequantize_weight,
  hadamard_quantize_reference,
  pack_int4,
  quantize_weight,
  unpack_int4,
  weight_codes,
)
from qstar_jax.quant import (
  QuestGrid,
  gaussian_mse_scale,
  grid_quantize,
  grid_values,
  hadamard,
  quantize_rotated,
  quest_grid,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_hand_computed_two_bit_row():
  # x_h = [3, -1, 1, -3, 0.2, -0.2, 5, -5]: sigma = sqrt((9+1+1+9+0.04+0.04+25+25)/8).
  x = np.asarray([[3.0, -1.0, 1.0, -3.0, 0.2, -0.2, 5.0, -5.0]], np.float32)
  sigma = math.sqrt(70.08 / 8)
  s = gaussian_mse_scale(2) * sigma
  d = 2 * s / 3  # levels -s, -D/2, D/2, s = -1.5D, -0.5D, 0.5D, 1.5D
  grid = quest_grid(jnp.asarray(x), 2)
  np.testing.assert_allclose(float(grid.sigma[0, 0]), sigma, rtol=1e-6)
  np.testing.assert_allclose(float(grid.scale[0, 0]), s, rtol=1e-6)
  np.testing.assert_allclose(float(grid.step[0, 0]), d, rtol=1e-6)
  # D = 2.95: 3 and 5 lie above D, the midpoint between the levels D/2 and s = 3D/2.
  assert 2.9 < d < 3.0
  codes = np.asarray(grid.codes(jnp.asarray(x)))
  np.testing.assert_array_equal(codes, [[1, -1, 0, -2, 0, -1, 1, -2]])
  np.testing.assert_allclose(np.asarray(grid.values(codes)),
                             [[1.5 * d, -0.5 * d, 0.5 * d, -1.5 * d, 0.5 * d, -0.5 * d,
                               1.5 * d, -1.5 * d]], rtol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_are_the_nearest_level_index(bits):
  x = np.random.default_rng(bits).standard_normal((4, 256)).astype(np.float32) * 2
  grid = quest_grid(jnp.asarray(x), bits)
  codes = np.asarray(grid.codes(jnp.asarray(x)))
  # Brute force in float64: the index of the nearest of the 2^b levels (c + 1/2) D.
  d = np.asarray(grid.step, np.float64)
  levels = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))  # the codes c
  dist = np.abs(x[..., None] / d[..., None] - (levels + 0.5))
  ref = levels[np.argmin(dist, axis=-1)]
  sorted_dist = np.sort(dist, axis=-1)
  clear = sorted_dist[..., 1] - sorted_dist[..., 0] > 1e-4  # away from midpoints
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(codes[clear], ref[clear])
  assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def test_ties_go_up_and_zero_rows_are_finite():
  grid = quest_grid(jnp.zeros((1, 8)), 4)
  assert grid.sigma[0, 0] == np.float32(1e-12)  # clamped, not 0
  np.testing.assert_array_equal(np.asarray(grid.codes(jnp.zeros((1, 8)))), 0)  # 0 -> +D/2
  assert np.all(np.isfinite(np.asarray(grid.values(grid.codes(jnp.zeros((1, 8)))))))


def test_from_sigma_is_quest_grid_with_the_rows_rms():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 64)), jnp.float32)
  grid = quest_grid(x, 3)
  again = QuestGrid.from_sigma(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True)), 3)
  for a, b in zip(grid, again, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_user_speaks_the_one_code_convention():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((6, 128)), jnp.float32)
  x_h = hadamard(x, 64, method="matmul")
  grid = quest_grid(x_h, 4)
  codes = grid.codes(x_h)
  # Kernel reference: int8 codes c and the row step.
  ref_codes, ref_step = hadamard_quantize_reference(x, 4, block=64)
  np.testing.assert_array_equal(np.asarray(ref_codes), np.asarray(codes).astype(np.int8))
  np.testing.assert_array_equal(np.asarray(ref_step), np.asarray(grid.step[:, 0]))
  # Fake quantizers: q = (c + 1/2) D and the odd integer m = 2c + 1 with half step D/2.
  q, _, _ = grid_quantize(x_h, 4)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(grid_values(codes, grid.step)))
  m, half = quantize_rotated(x, 4, 64, "quest", None)
  np.testing.assert_array_equal(np.asarray(m), 2 * np.asarray(codes) + 1)
  np.testing.assert_array_equal(np.asarray(half), 0.5 * np.asarray(grid.step))
  # Weights: the same codes, stored int8 or as int4 nibbles, transposed to [K, N].
  for pack in (False, True):
    qw = quantize_weight(x.T, w_bits=4, a_bits=None, block=64, pack=pack)
    np.testing.assert_array_equal(np.asarray(weight_codes(qw)), np.asarray(ref_codes).T)
    np.testing.assert_array_equal(np.asarray(dequantize_weight(qw)),
                                  np.asarray(grid_values(ref_codes.T, ref_step[None, :])))
  np.testing.assert_array_equal(np.asarray(unpack_int4(pack_int4(ref_codes.T))),
                                np.asarray(ref_codes).T)


def test_weight_codes_refuses_a_full_precision_weight():
  qw = quantize_weight(jnp.ones((64, 8)), w_bits=None, a_bits=4, block=64)
  with pytest.raises(ValueError, match="w_bits is None"):
    weight_codes(qw)


def test_quant_imports_only_math():
  """`qstar_jax.quant` is the bottom layer: jax, numpy, the standard library and itself."""
  allowed_roots = {"jax", "numpy", "__future__", "dataclasses", "functools", "math", "typing"}
  for path in sorted((REPO / "qstar_jax" / "quant").glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
      else:
        continue
      for name in names:
        ok = name.split(".")[0] in allowed_roots or name.startswith("qstar_jax.quant")
        assert ok, f"{path.name} imports {name}: quant may import only jax, numpy and quant"


def test_quest_grid_runs_under_jit_and_grad():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 32)), jnp.float32)
  out = jax.jit(lambda v: quest_grid(v, 2).values(quest_grid(v, 2).codes(v)))(x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(grid_quantize(x, 2)[0]))
  # sigma carries no gradient: the step is a constant to autodiff.
  g = jax.grad(lambda v: jnp.sum(quest_grid(v, 2).step))(x)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
