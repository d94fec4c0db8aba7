"""qstar_jax.models.params.quantized_param_count against the parameters of a built model."""

from __future__ import annotations

import jax
from flax import nnx

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.llama import Llama
from qstar_jax.models.params import count_params, quantized_param_count


def test_counts_the_projection_kernels_only():
  # Grouped-query attention, head_dim != hidden / heads, Qwen2 biases, an untied LM head: only
  # the q/k/v/o/gate/up/down kernels count.
  cfg = LlamaConfig(vocab_size=40, hidden_size=24, intermediate_size=40, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                    max_position_embeddings=16)
  params = nnx.state(jax.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  flat = [(jax.tree_util.keystr(path), x) for path, x in
          jax.tree_util.tree_leaves_with_path(params)]
  kernels = sum(x.size for path, x in flat if "proj" in path and "kernel" in path)
  assert quantized_param_count(cfg) == kernels
  # By hand: 2 layers x (q 24*32 + k 24*16 + v 24*16 + o 32*24 + 3 * 24*40).
  assert kernels == 2 * (768 + 384 + 384 + 768 + 2880)
  biases = sum(x.size for path, x in flat if "proj" in path and "bias" in path)
  assert biases == 2 * (32 + 16 + 16) and count_params(params) > kernels + biases
