"""Hugging Face checkpoints: config.json + safetensors (single file or sharded) -> Llama.

Supported: `LlamaForCausalLM` and `Qwen2ForCausalLM` directories written by transformers v4
(`rope_theta` + `rope_scaling`, `torch_dtype`) or v5 (`rope_parameters`, `dtype`); tied
embeddings with or without an `lm_head.weight` tensor; bf16/fp16/fp32 tensors. The
safetensors reader is our own (a JSON header + raw little-endian buffers, memory-mapped) so
that a damaged file fails with a `CorruptFileError` that names the file and the problem.

Name mapping (HF [out, in] Linear weights are transposed to our [in, out] kernels):
  model.embed_tokens.weight                    -> embed_tokens.embedding
  model.layers.{i}.input_layernorm.weight      -> layers.{i}.input_norm.scale
  model.layers.{i}.self_attn.{q,k,v}_proj.*    -> layers.{i}.attn.{q,k,v}_proj.{kernel,bias}
  model.layers.{i}.self_attn.o_proj.weight     -> layers.{i}.attn.o_proj.kernel
  model.layers.{i}.post_attention_layernorm.*  -> layers.{i}.post_attn_norm.scale
  model.layers.{i}.mlp.{gate,up,down}_proj.*   -> layers.{i}.mlp.{gate,up,down}_proj.kernel
  model.norm.weight                            -> final_norm.scale
  lm_head.weight                               -> lm_head.kernel (dropped when tied)
"""

from __future__ import annotations

import json
import math
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
from qstar_jax.models.tokenizer import HFTokenizer

__all__ = [
  "read_safetensors",
  "config_from_hf",
  "hf_to_flat",
  "load_hf_checkpoint",
  "load_hf",
]

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes

  return {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
  }


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
  """The parsed JSON header of a safetensors file and the byte offset of its data.

  Raises:
    CorruptFileError: the file is too short, the header length is impossible, or the header
      is not a JSON object.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise CorruptFileError(
        f"safetensors file {path} has {size} bytes: too short to hold the 8-byte header length"
      )
    n = int.from_bytes(prefix, "little")
    if n > size - 8 or n > _MAX_HEADER_BYTES:
      raise CorruptFileError(
        f"safetensors file {path}: header length {n} bytes does not fit the file "
        f"({size} bytes); the file is truncated or its header is corrupted"
      )
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptFileError(
      f"safetensors file {path}: the {n}-byte header is not valid JSON ({e}); "
      "the file is corrupted"
    ) from None
  if not isinstance(header, dict):
    raise CorruptFileError(
      f"safetensors file {path}: header is a JSON {type(header).__name__}, expected an object"
    )
  return header, 8 + n


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays (memory-mapped, read-only).

  Every entry is validated against the file before anything is returned: a known dtype, a
  shape, and data offsets that lie inside the file and match shape * itemsize.
  """
  path = pathlib.Path(path)
  header, data_start = read_safetensors_header(path)
  dtypes = _safetensors_dtypes()
  data_size = path.stat().st_size - data_start
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise CorruptFileError(
        f"safetensors file {path}: entry {name!r} = {info!r} lacks dtype/shape/data_offsets"
      )
    dtype = dtypes.get(info["dtype"])
    if dtype is None:
      raise CorruptFileError(
        f"safetensors file {path}: tensor {name} has dtype {info['dtype']!r}; "
        f"supported: {sorted(dtypes)}"
      )
    shape, offsets = info["shape"], info["data_offsets"]
    if (
      not isinstance(shape, list)
      or not all(isinstance(s, int) and s >= 0 for s in shape)
      or not isinstance(offsets, list)
      or len(offsets) != 2
      or not all(isinstance(o, int) for o in offsets)
    ):
      raise CorruptFileError(
        f"safetensors file {path}: tensor {name} has shape {shape!r} and data_offsets "
        f"{offsets!r}; expected lists of non-negative ints"
      )
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_size or end - begin != nbytes:
      raise CorruptFileError(
        f"safetensors file {path}: tensor {name} (shape {tuple(shape)}, {info['dtype']}) "
        f"claims bytes [{begin}, {end}) of a {data_size}-byte data section; expected "
        f"{nbytes} bytes inside it (the file is truncated or corrupted)"
      )
    entries[name] = (dtype, tuple(shape), begin)
  if not entries:
    return {}
  buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
  out = {}
  for name, (dtype, shape, begin) in entries.items():
    count = math.prod(shape)
    out[name] = np.frombuffer(buffer, dtype=dtype, count=count, offset=begin).reshape(shape)
  return out


# --------------------------------------------------------------------------------- config

_ARCHITECTURES = {
  "llama": "llama",
  "qwen2": "qwen2",
  "LlamaForCausalLM": "llama",
  "Qwen2ForCausalLM": "qwen2",
}


def _rope_settings(cfg: Mapping[str, Any]) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling tuple) from a v4 (rope_theta/rope_scaling) or v5 config."""
  params = cfg.get("rope_parameters")  # transformers v5
  if params is None:
    params = cfg.get("rope_scaling")  # transformers v4 (None when unscaled)
  params = dict(params or {})
  if "full_attention" in params and isinstance(params["full_attention"], Mapping):
    params = dict(params["full_attention"])  # v5 per-layer-type layout
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise CheckpointError(
      f"config.json partial_rotary_factor={partial!r}: only full rotary embeddings (1.0) "
      "are supported"
    )
  if rope_type in (None, "default"):
    return float(theta), None
  if rope_type == "linear":
    return float(theta), (("rope_type", "linear"), ("factor", float(params["factor"])))
  if rope_type == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in params]
    if missing:
      raise CheckpointError(f"config.json llama3 rope scaling {params} lacks {missing}")
    scaling = (("rope_type", "llama3"),) + tuple((k, float(params[k])) for k in keys)
    return float(theta), scaling
  raise CheckpointError(
    f"config.json rope_type={rope_type!r} is not supported; expected 'default', 'linear' "
    "or 'llama3'"
  )


def _id_list(value: Any) -> list[int]:
  if value is None:
    return []
  if isinstance(value, list | tuple):
    return [int(v) for v in value]
  return [int(value)]


def config_from_hf(
  cfg: Mapping[str, Any],
  *,
  dtype: str | None = "float32",
  generation_config: Mapping[str, Any] | None = None,
) -> LlamaConfig:
  """Maps a Hugging Face config.json (v4 or v5 style) to a `LlamaConfig`.

  Args:
    cfg: the parsed config.json.
    dtype: parameter and compute dtype; None keeps the checkpoint's own `dtype`/`torch_dtype`.
    generation_config: the parsed generation_config.json, whose eos ids are added.

  Raises:
    UnknownArchitectureError: model_type/architectures is not Llama or Qwen2.
    CheckpointError: a setting this implementation does not support.
  """
  model_type = cfg.get("model_type")
  architectures = list(cfg.get("architectures") or [])
  arch = _ARCHITECTURES.get(model_type)
  if arch is None and model_type is None and architectures:
    arch = _ARCHITECTURES.get(architectures[0])
  if arch is None:
    raise UnknownArchitectureError(
      f"config.json model_type={model_type!r} (architectures={architectures}) is not "
      "supported; expected model_type 'llama' or 'qwen2' (LlamaForCausalLM, Qwen2ForCausalLM)"
    )
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise CheckpointError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
  if cfg.get("mlp_bias", False):
    raise CheckpointError("config.json mlp_bias=True: MLP biases are not supported")
  if arch == "qwen2":
    attention_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    if cfg.get("use_sliding_window", False):
      warnings.warn(
        f"config.json use_sliding_window=True (sliding_window={cfg.get('sliding_window')}): "
        "sliding-window attention is not implemented; attention is full-context",
        stacklevel=3,
      )
  else:
    attention_bias = bool(cfg.get("attention_bias", False))
    if attention_bias:
      raise CheckpointError(
        "config.json attention_bias=True for a Llama model: HF Llama then also has an o_proj "
        "bias, which this implementation does not have"
      )
  theta, scaling = _rope_settings(cfg)
  if dtype is None:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"  # v5 / v4 key
  if dtype not in ("float32", "bfloat16", "float16"):
    raise CheckpointError(f"dtype={dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
  eos = _id_list(cfg.get("eos_token_id"))
  for i in _id_list((generation_config or {}).get("eos_token_id")):
    if i not in eos:
      eos.append(i)
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads")  # fmt: skip
  missing = [k for k in required if k not in cfg]
  if missing:
    raise CheckpointError(f"config.json lacks {missing}")
  try:
    return LlamaConfig(
      vocab_size=int(cfg["vocab_size"]),
      hidden_size=int(cfg["hidden_size"]),
      intermediate_size=int(cfg["intermediate_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=int(cfg["num_attention_heads"]),
      num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
      head_dim=None if cfg.get("head_dim") is None else int(cfg["head_dim"]),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      attention_bias=attention_bias,
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
      eos_token_ids=tuple(eos),
      param_dtype=dtype,
      dtype=dtype,
      architecture=arch,
    )
  except ValueError as e:
    raise CheckpointError(f"config.json does not describe a valid model: {e}") from None


# ---------------------------------------------------------------------------- tensor names

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
  # hf suffix: (our suffix, transpose)
  "input_layernorm.weight": ("input_norm.scale", False),
  "post_attention_layernorm.weight": ("post_attn_norm.scale", False),
  "self_attn.q_proj.weight": ("attn.q_proj.kernel", True),
  "self_attn.k_proj.weight": ("attn.k_proj.kernel", True),
  "self_attn.v_proj.weight": ("attn.v_proj.kernel", True),
  "self_attn.q_proj.bias": ("attn.q_proj.bias", False),
  "self_attn.k_proj.bias": ("attn.k_proj.bias", False),
  "self_attn.v_proj.bias": ("attn.v_proj.bias", False),
  "self_attn.o_proj.weight": ("attn.o_proj.kernel", True),
  "mlp.gate_proj.weight": ("mlp.gate_proj.kernel", True),
  "mlp.up_proj.weight": ("mlp.up_proj.kernel", True),
  "mlp.down_proj.weight": ("mlp.down_proj.kernel", True),
}
_TOP_NAMES = {
  "embed_tokens.weight": ("embed_tokens.embedding", False),
  "norm.weight": ("final_norm.scale", False),
  "lm_head.weight": ("lm_head.kernel", True),
}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _our_name(hf_name: str) -> tuple[str, bool] | None:
  name = hf_name[len("model.") :] if hf_name.startswith("model.") else hf_name
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  m = _LAYER_RE.match(name)
  if m and m.group(2) in _LAYER_NAMES:
    ours, transpose = _LAYER_NAMES[m.group(2)]
    return f"layers.{m.group(1)}.{ours}", transpose
  return None


def hf_to_flat(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
  """HF tensor dict -> our flat parameter dict, validated against `config` first.

  Raises:
    CheckpointError: tensors missing from the checkpoint, or not belonging to the model.
    ShapeMismatchError: a tensor's shape differs from what config.json implies (named with
      its checkpoint name and both shapes in the checkpoint's [out, in] orientation).
  """
  expected = flat_param_shapes(config)
  mapped: dict[str, tuple[str, bool]] = {}
  unexpected = []
  for hf_name in tensors:
    if _IGNORED.search(hf_name):
      continue
    target = _our_name(hf_name)
    if target is None:
      unexpected.append(hf_name)
      continue
    if target[0] == "lm_head.kernel" and config.tie_word_embeddings:
      continue  # tied: the LM head is the embedding (some checkpoints still store a copy)
    if target[0] not in expected:
      unexpected.append(hf_name)
      continue
    mapped[target[0]] = (hf_name, target[1])
  check_tensor_names(
    [_hf_name(n) for n in set(expected) - set(mapped)], unexpected,
    context="checkpoint does not match config.json "
    f"({config.architecture}, {config.num_layers} layers, attention_bias="
    f"{config.attention_bias}, tie_word_embeddings={config.tie_word_embeddings})")
  for ours, (hf_name, transpose) in mapped.items():
    want = expected[ours][::-1] if transpose else expected[ours]
    got = tuple(tensors[hf_name].shape)
    if got != tuple(want):
      raise ShapeMismatchError(
        f"checkpoint tensor {hf_name} has shape {got}, config.json expects {tuple(want)}"
      )
  flat = {}
  for ours, (hf_name, transpose) in mapped.items():
    array = tensors[hf_name]
    flat[ours] = array.T if transpose else array
  return flat


def _hf_name(ours: str) -> str:
  for hf, (name, _) in _TOP_NAMES.items():
    if name == ours:
      return hf if hf == "lm_head.weight" else "model." + hf
  m = _LAYER_RE.match(ours)
  if m:
    for hf, (name, _) in _LAYER_NAMES.items():
      if name == m.group(2):
        return f"model.layers.{m.group(1)}.{hf}"
  return ours


# -------------------------------------------------------------------------------- loading


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CorruptFileError(f"{index} is not a safetensors index ({e})") from None
    files = sorted({directory / f for f in weight_map.values()})
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
      raise CheckpointError(f"{index} lists shards that do not exist: {absent}")
    return files
  single = directory / "model.safetensors"
  if single.is_file():
    return [single]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise CheckpointError(
      f"no safetensors weights in {directory} (expected model.safetensors or "
      "model.safetensors.index.json; PyTorch .bin checkpoints are not read)"
    )
  return files


def load_hf_checkpoint(
  directory: str | os.PathLike, *, dtype: str | None = "float32"
) -> tuple[LlamaConfig, dict[str, np.ndarray], Any]:
  """Reads and validates a HF directory: (config, flat params, tokenizer or None).

  Nothing is built until every file has been parsed and every tensor checked.
  """
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise CheckpointError(f"{directory} has no config.json")
  try:
    raw_config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CorruptFileError(f"{config_path} is not valid JSON ({e})") from None
  generation_path = directory / "generation_config.json"
  generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
  config = config_from_hf(raw_config, dtype=dtype, generation_config=generation)

  tokenizer = None
  if (directory / "tokenizer.json").is_file():
    tokenizer = HFTokenizer(directory, eos_ids=config.eos_token_ids or None)
    if tokenizer.vocab_size > config.vocab_size:
      raise TokenizerMismatchError(
        f"tokenizer {directory / 'tokenizer.json'} has vocab_size {tokenizer.vocab_size} (ids "
        f"up to {tokenizer.vocab_size - 1}) but the model's embedding has vocab_size "
        f"{config.vocab_size}; they do not belong together"
      )

  tensors: dict[str, np.ndarray] = {}
  for file in _safetensors_files(directory):
    for name, array in read_safetensors(file).items():
      if name in tensors:
        raise CheckpointError(f"tensor {name} appears in more than one shard (again in {file})")
      tensors[name] = array
  flat = hf_to_flat(tensors, config)
  return config, flat, tokenizer


def load_hf(directory: str | os.PathLike, *, dtype: str | None = "float32"):
  """Loads a HF Llama/Qwen2 directory: (Llama model, HFTokenizer or None)."""
  config, flat, tokenizer = load_hf_checkpoint(directory, dtype=dtype)
  return from_flat_params(config, flat), tokenizer
