"""`ByteTokenizer`: UTF-8 bytes as token ids 0..255, the tokenizer of randomly initialised
`preset:` models (no vocabulary file needed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255; ids >= 256 of a larger vocabulary decode to nothing."""

  bos_id = None
  eos_ids: tuple[int, ...] = ()

  def __init__(self, vocab_size: int = 256):
    if vocab_size < 256:
      raise ValueError(f"ByteTokenizer vocab_size={vocab_size}: expected >= 256 (one id a byte)")
    self.vocab_size = vocab_size

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """`role: content` lines, then `assistant: ` when a generation prompt is asked for."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")
