"""The QuEST-converted model: a QuEST-trained Llama with integer weights and integer matmuls.

`convert_to_integer` swaps each quantized block projection (a fake-quantized `Dense`) for a
`QuantizedDense` that holds the weight's grid codes and runs `quantized_matmul` (the Pallas
kernels on GPU, their XLA references elsewhere): the same numbers as the fake-quantized model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qstar_jax.kernels.dispatch import QuantizedWeight, quantize_weight, quantized_matmul

__all__ = ["QuantizedDense", "convert_to_integer"]


class QuantizedDense(nnx.Module):
  """Inference replacement of a QuEST `Dense`: integer weight codes + `quantized_matmul`.

  `y = q_a(x H) q_w(W H)^T (+ bias)`, computed by the Pallas kernels on GPU/TPU (or when
  `use_kernel=True`) and by the equivalent XLA path otherwise.
  """

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, *, quant, dtype,
               use_kernel: bool | None = None, pack_int4: bool | None = None):
    qw = quantize_weight(jnp.asarray(kernel, jnp.float32), w_bits=quant.w_bits,
                         a_bits=quant.a_bits, block=quant.hadamard_block, pack=pack_int4)
    self.codes = nnx.Param(qw.codes)
    self.step = nnx.Param(qw.step)
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    self.w_bits, self.a_bits, self.block, self.packed = qw.w_bits, qw.a_bits, qw.block, qw.packed
    self.dtype = jnp.dtype(dtype)
    self.use_kernel = use_kernel

  def __call__(self, x: jax.Array) -> jax.Array:
    qw = QuantizedWeight(self.codes[...], self.step[...], self.w_bits, self.a_bits,
                         self.block, self.packed)
    y = quantized_matmul(x, qw, use_kernel=self.use_kernel).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


_PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "mlp": ("gate_proj", "up_proj", "down_proj")}


def convert_to_integer(model, *, use_kernel: bool | None = None,
                       pack_int4: bool | None = None):
  """Replaces every quantized block projection of a `Llama` by a `QuantizedDense`, in place.

  The model must have `config.quant` with both bits or weight bits set. Embeddings, norms
  and the LM head are untouched (full precision). Returns the model for chaining; afterwards
  `nnx.split` / `decode` work as before, now through `quantized_matmul`.
  """
  quant = model.config.quant
  if quant is None:
    raise ValueError("convert_to_integer: model.config.quant is None: nothing to convert")
  for layer in model.layers:
    for group, names in _PROJECTIONS.items():
      parent = getattr(layer, group)
      for name in names:
        dense = getattr(parent, name)
        bias = None if dense.bias is None else dense.bias[...]
        setattr(parent, name, QuantizedDense(
          dense.kernel[...], bias, quant=quant, dtype=model.config.dtype,
          use_kernel=use_kernel, pack_int4=pack_int4))
  return model
