"""GGUF files (llama.cpp) -> Llama: config from the metadata, tensors dequantised to float32.

Supported: `general.architecture == "llama"`; tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1
(and any other type `gguf.quants.dequantize` knows); tied embeddings (no `output.weight`);
the byte-level BPE tokenizer and chat template from the `tokenizer.*` metadata.

llama.cpp's converter stores the q/k projection rows permuted so that rotary pairs are
interleaved (dimensions 2j, 2j+1 of a head rotate together) instead of Hugging Face's
rotate_half layout (j with j + hd/2). Per head, a GGUF row index r = 2j + s (s in {0, 1})
holds HF row s * hd/2 + j; `unpermute_rotary` undoes it:

  w_hf = w_gguf.reshape(H, hd/2, 2, in).swapaxes(1, 2).reshape(H * hd, in)

Tensor names:
  token_embd.weight -> embed_tokens.embedding      output_norm.weight -> final_norm.scale
  output.weight     -> lm_head.kernel (transposed)
  blk.{i}.attn_norm / ffn_norm.weight -> layers.{i}.input_norm / post_attn_norm.scale
  blk.{i}.attn_{q,k,v}.{weight,bias}  -> layers.{i}.attn.{q,k,v}_proj.{kernel,bias}
  blk.{i}.attn_output.weight          -> layers.{i}.attn.o_proj.kernel
  blk.{i}.ffn_{gate,up,down}.weight   -> layers.{i}.mlp.{gate,up,down}_proj.kernel
"""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from qstar_jax.models.config import LlamaConfig, flat_param_shapes
from qstar_jax.models.errors import (
  CheckpointError,
  CorruptFileError,
  ShapeMismatchError,
  TokenizerMismatchError,
  UnknownArchitectureError,
  check_tensor_names,
)
from qstar_jax.models.llama import from_flat_params
from qstar_jax.models.tokenizer import GGUFTokenizer

__all__ = [
  "open_gguf",
  "read_metadata",
  "config_from_gguf",
  "unpermute_rotary",
  "gguf_to_flat",
  "load_gguf_checkpoint",
  "load_gguf_tokenizer",
  "load_gguf",
]

_GGUF_MAGIC = b"GGUF"
# Arrays of the tokenizer that are large; other array fields are read as well.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")  # fmt: skip


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` for `path`, with every tensor checked to lie inside the file.

  Raises:
    CorruptFileError: not a GGUF file, truncated, or its header cannot be parsed.
  """
  import gguf

  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _GGUF_MAGIC:
    raise CorruptFileError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
    raise CorruptFileError(
      f"GGUF file {path} ({size} bytes) cannot be parsed: {type(e).__name__}: {e}; "
      "the file is truncated or corrupted"
    ) from None
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size:
      raise CorruptFileError(
        f"GGUF file {path}: tensor {t.name} needs bytes up to {end} but the file has {size}; "
        "the file is truncated"
      )
  return reader


def _field_value(field) -> Any:
  value = field.contents()
  if isinstance(value, np.generic):
    value = value.item()
  return value


def read_metadata(path_or_reader, *, tokenizer_arrays: bool = True) -> dict[str, Any]:
  """All metadata key/values of a GGUF file as plain Python values.

  Args:
    path_or_reader: a path or an open `gguf.GGUFReader`.
    tokenizer_arrays: also decode the large tokenizer arrays (tokens, merges, types, scores).
  """
  reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str | os.PathLike) else (
    path_or_reader)  # fmt: skip
  meta = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    if not tokenizer_arrays and key in _TOKENIZER_ARRAYS:
      continue
    try:
      meta[key] = _field_value(field)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
      raise CorruptFileError(f"GGUF metadata {key!r} cannot be decoded ({e})") from None
  return meta


def config_from_gguf(
  meta: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]], *, dtype: str = "float32"
) -> LlamaConfig:
  """`LlamaConfig` from GGUF metadata (+ tensor shapes for the vocabulary and tying).

  Raises:
    UnknownArchitectureError: general.architecture is not "llama".
    CheckpointError: a required key is missing or a feature is unsupported.
  """
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise UnknownArchitectureError(
      f"GGUF general.architecture={arch!r} is not supported; expected 'llama'"
    )

  def key(name, default=...):
    full = f"{arch}.{name}"
    if full in meta:
      return meta[full]
    if default is ...:
      raise CheckpointError(f"GGUF metadata lacks {full!r}")
    return default

  num_heads = int(key("attention.head_count"))
  hidden = int(key("embedding_length"))
  head_dim = key("attention.key_length", None)
  rope_dim = key("rope.dimension_count", None)
  head_dim = int(head_dim) if head_dim is not None else hidden // num_heads
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise CheckpointError(
      f"GGUF {arch}.rope.dimension_count={rope_dim} differs from head_dim={head_dim}: "
      "partial rotary embeddings are not supported"
    )
  if "rope_freqs.weight" in tensor_shapes:
    raise CheckpointError(
      "GGUF tensor rope_freqs.weight (llama.cpp's per-frequency rope factors, e.g. Llama-3.1 "
      "scaling) is not supported"
    )
  scaling = None
  scaling_type = key("rope.scaling.type", None)
  if scaling_type not in (None, "none"):
    if scaling_type != "linear":
      raise CheckpointError(
        f"GGUF {arch}.rope.scaling.type={scaling_type!r}: only 'linear' is supported"
      )
    scaling = (("rope_type", "linear"), ("factor", float(key("rope.scaling.factor"))))

  if "token_embd.weight" not in tensor_shapes:
    raise CheckpointError("GGUF file has no token_embd.weight tensor")
  vocab = int(tensor_shapes["token_embd.weight"][0])
  eos = meta.get("tokenizer.ggml.eos_token_id")
  eos_ids = [] if eos is None else [int(eos)]
  eot = meta.get("tokenizer.ggml.eot_token_id")
  if eot is not None and int(eot) not in eos_ids:
    eos_ids.append(int(eot))
  bos = meta.get("tokenizer.ggml.bos_token_id")
  attention_bias = "blk.0.attn_q.bias" in tensor_shapes
  try:
    return LlamaConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(key("feed_forward_length")),
      num_layers=int(key("block_count")),
      num_heads=num_heads,
      num_kv_heads=int(key("attention.head_count_kv", num_heads)),
      head_dim=None if head_dim == hidden // num_heads else head_dim,
      max_position_embeddings=int(key("context_length", 2048)),
      rope_theta=float(key("rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
      attention_bias=attention_bias,
      tie_word_embeddings="output.weight" not in tensor_shapes,
      bos_token_id=None if bos is None else int(bos),
      eos_token_ids=tuple(eos_ids),
      param_dtype=dtype,
      dtype=dtype,
      architecture="llama",
    )
  except ValueError as e:
    raise CheckpointError(f"GGUF metadata does not describe a valid model: {e}") from None


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's interleaved-rotary row order -> Hugging Face's rotate_half order.

  `w` is [H * hd, ...] (a q/k weight [out, in] or bias [out]).
  """
  rows = w.shape[0]
  if rows % (2 * num_heads):
    raise ShapeMismatchError(
      f"rotary tensor with {rows} rows cannot be split into {num_heads} heads of even size"
    )
  half = rows // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
  "attn_norm.weight": ("input_norm.scale", False),
  "ffn_norm.weight": ("post_attn_norm.scale", False),
  "attn_q.weight": ("attn.q_proj.kernel", True),
  "attn_k.weight": ("attn.k_proj.kernel", True),
  "attn_v.weight": ("attn.v_proj.kernel", True),
  "attn_q.bias": ("attn.q_proj.bias", False),
  "attn_k.bias": ("attn.k_proj.bias", False),
  "attn_v.bias": ("attn.v_proj.bias", False),
  "attn_output.weight": ("attn.o_proj.kernel", True),
  "ffn_gate.weight": ("mlp.gate_proj.kernel", True),
  "ffn_up.weight": ("mlp.up_proj.kernel", True),
  "ffn_down.weight": ("mlp.down_proj.kernel", True),
}
_TOP_NAMES = {
  "token_embd.weight": ("embed_tokens.embedding", False),
  "output_norm.weight": ("final_norm.scale", False),
  "output.weight": ("lm_head.kernel", True),
}


def _our_name(gguf_name: str) -> tuple[str, bool] | None:
  if gguf_name in _TOP_NAMES:
    return _TOP_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    ours, transpose = _BLOCK_NAMES[m.group(2)]
    return f"layers.{m.group(1)}.{ours}", transpose
  return None


def _numpy_shape(tensor) -> tuple[int, ...]:
  # GGUF lists dimensions innermost first (ne0 = row length); numpy order is the reverse.
  return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def gguf_to_flat(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Dequantises and maps every tensor (validated by name and shape before any work)."""
  import gguf

  expected = flat_param_shapes(config)
  plan = {}
  unexpected = []
  for t in reader.tensors:
    target = _our_name(t.name)
    if target is None or target[0] not in expected:
      unexpected.append(t.name)
      continue
    plan[target[0]] = (t, target[1])
  check_tensor_names(set(expected) - set(plan), unexpected,
                     context="GGUF tensors do not match its metadata (missing ones by our names)")
  for ours, (t, transpose) in plan.items():
    want = expected[ours][::-1] if transpose else expected[ours]
    got = _numpy_shape(t)
    if got != tuple(want):
      raise ShapeMismatchError(
        f"GGUF tensor {t.name} has shape {got} ([out, in]), the metadata implies {tuple(want)}"
      )

  flat = {}
  for ours, (t, transpose) in plan.items():
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
      raise CheckpointError(
        f"GGUF tensor {t.name} ({t.tensor_type.name}) cannot be dequantized: {e}"
      ) from None
    w = w.reshape(_numpy_shape(t))
    if ours.endswith(("q_proj.kernel", "q_proj.bias")):
      w = unpermute_rotary(w, config.num_heads)
    elif ours.endswith(("k_proj.kernel", "k_proj.bias")):
      w = unpermute_rotary(w, config.num_kv_heads)
    flat[ours] = np.ascontiguousarray(w.T) if transpose else w
  return flat


def _tokenizer_from_metadata(meta: Mapping[str, Any], name: str) -> GGUFTokenizer | None:
  """The file's byte-level BPE tokenizer, or None (with a warning for an unsupported kind)."""
  if "tokenizer.ggml.tokens" not in meta:
    return None
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    warnings.warn(
      f"GGUF {name}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' "
      "byte-level BPE); the model loads with tokenizer None",
      stacklevel=3,
    )
    return None
  return GGUFTokenizer.from_metadata(meta)


def load_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer | None:
  """The tokenizer stored in a GGUF file's metadata (None if it has none), without its tensors."""
  path = pathlib.Path(path)
  return _tokenizer_from_metadata(read_metadata(open_gguf(path), tokenizer_arrays=True), path.name)


def load_gguf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32"):
  """Reads and validates a GGUF file: (config, flat float32 params, tokenizer or None)."""
  path = pathlib.Path(path)
  reader = open_gguf(path)
  meta = read_metadata(reader, tokenizer_arrays=True)
  shapes = {t.name: _numpy_shape(t) for t in reader.tensors}
  config = config_from_gguf(meta, shapes, dtype=dtype)

  tokenizer = _tokenizer_from_metadata(meta, path.name)
  if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
    raise TokenizerMismatchError(
      f"GGUF {path}: the tokenizer has vocab_size {tokenizer.vocab_size} but token_embd.weight "
      f"has {config.vocab_size} rows; they do not belong together"
    )
  flat = gguf_to_flat(reader, config)
  return config, flat, tokenizer


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32"):
  """Loads a Llama GGUF file: (Llama model, GGUFTokenizer or None)."""
  config, flat, tokenizer = load_gguf_checkpoint(path, dtype=dtype)
  return from_flat_params(config, flat), tokenizer
