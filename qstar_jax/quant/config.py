"""Quantization settings of a layer: which bits, which gradient estimator."""

from __future__ import annotations

import dataclasses

METHODS = ("quest", "ste", "clip_ste")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a linear layer quantizes its input activations and its weight.

  Attributes:
    w_bits: bits of the weight grid (1..8), or None to keep weights full precision.
    a_bits: bits of the activation grid (1..8), or None to keep activations full precision.
    method: gradient estimator: "quest" (Hadamard + trust mask), "ste" (identity gradient on
      the same grid) or "clip_ste" (gradient masked to |x| <= s).
    hadamard_block: block size of the block-diagonal Hadamard transform (a power of two); the
      contraction dimension must be a multiple of it (or smaller, then the whole dimension).
    trust_factor: None for QuEST's default trust radius T = alpha_b / (2^b - 1) (half a step),
      else T as a multiple of the RMS scale sigma.
  """

  w_bits: int | None = 4
  a_bits: int | None = 4
  method: str = "quest"
  hadamard_block: int = 128
  trust_factor: float | None = None

  def __post_init__(self):
    for name in ("w_bits", "a_bits"):
      bits = getattr(self, name)
      if bits is not None and (not isinstance(bits, int) or not 1 <= bits <= 8):
        raise ValueError(f"QuantConfig.{name}={bits!r}: expected an int in 1..8 or None")
    if self.method not in METHODS:
      raise ValueError(f"QuantConfig.method={self.method!r}: expected one of {METHODS}")
    block = self.hadamard_block
    if not isinstance(block, int) or block < 1 or block & (block - 1):
      raise ValueError(f"QuantConfig.hadamard_block={block!r}: expected a power of two >= 1")
