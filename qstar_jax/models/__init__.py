"""qstar_jax.models: Llama-family policy/value transformers, KV-cache decoding, weight loading."""

__all__: list[str] = []

# The transformer, its config, KV-cache decoding and value heads.
from qstar_jax.models.config import (  # noqa: E402
  LlamaConfig,
  flat_param_shapes,
  get_config,
  preset_names,
)
from qstar_jax.models.decoding import (  # noqa: E402
  DecodeResult,
  SamplingConfig,
  StepSamples,
  decode,
  decode_unchecked,
  delimiter_token_ids,
  filter_logits,
  model_config_of,
  sample_steps,
  sample_tokens,
)
from qstar_jax.models.heads import (  # noqa: E402
  PolicyValue,
  ValueHead,
  policy_value_apply,
  value_apply,
)
from qstar_jax.models.kv_cache import KVCache  # noqa: E402
from qstar_jax.models.llama import (  # noqa: E402
  Llama,
  apply,
  apply_hidden,
  apply_logits,
  from_flat_params,
  get_flat_params,
  init_llama,
  set_flat_params,
)

__all__ += [
  "DecodeResult",
  "SamplingConfig",
  "StepSamples",
  "decode",
  "decode_unchecked",
  "delimiter_token_ids",
  "filter_logits",
  "sample_tokens",
  "model_config_of",
  "sample_steps",
  "PolicyValue",
  "ValueHead",
  "policy_value_apply",
  "value_apply",
  "LlamaConfig",
  "get_config",
  "preset_names",
  "KVCache",
  "Llama",
  "apply",
  "apply_hidden",
  "apply_logits",
  "flat_param_shapes",
  "from_flat_params",
  "get_flat_params",
  "init_llama",
  "set_flat_params",
]

# Weight loading, tokenizers and the loaders' errors.
from qstar_jax.models import errors  # noqa: E402
from qstar_jax.models.byte_tokenizer import ByteTokenizer  # noqa: E402
from qstar_jax.models.loading import load_model_spec, load_pretrained  # noqa: E402
from qstar_jax.models.tokenizer import (  # noqa: E402
  GGUFTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  train_sentencepiece,
)

__all__ += [
  "errors",
  "load_model_spec",
  "load_pretrained",
  "ByteTokenizer",
  "GGUFTokenizer",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "train_sentencepiece",
]

# Puzzle networks (DeepCubeA residual MLP, V or per-action Q head).
from qstar_jax.models.puzzle_net import PuzzleNet, PuzzleNetConfig, puzzle_net_apply_fn  # noqa: E402

__all__ += ["PuzzleNet", "PuzzleNetConfig", "puzzle_net_apply_fn"]

# Parameter counts and the QuEST model converted to integer weights.
from qstar_jax.models.params import count_params, param_bytes, quantized_param_count  # noqa: E402
from qstar_jax.models.quantized import QuantizedDense, convert_to_integer  # noqa: E402

__all__ += ["count_params", "param_bytes", "quantized_param_count", "QuantizedDense",
            "convert_to_integer"]

# The paged tree KV cache for search over reasoning steps (shared prompt, copy-on-write pages).
from qstar_jax.models import tree_cache  # noqa: E402
from qstar_jax.models.tree_cache import TreeKVCache, TreeStep, init_tree_cache, tree_step  # noqa: E402

# fork_nodes, release_nodes, copy_nodes, cascade_attention and the step-level path
# (StepKV, gather_ancestors, step_decode, commit_steps): `models.tree_cache.<name>`.
__all__ += ["tree_cache", "TreeKVCache", "TreeStep", "init_tree_cache", "tree_step"]

from qstar_jax.models.arithmetic_policy import (  # noqa: E402
  ArithmeticPolicy,
  load_arithmetic_policy,
  save_arithmetic_policy,
)

__all__ += ["ArithmeticPolicy", "load_arithmetic_policy", "save_arithmetic_policy"]
