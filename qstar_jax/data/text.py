"""Tiny Shakespeare: the character-level LM corpus (1,115,394 bytes), read from local data."""

from __future__ import annotations

import os
import pathlib

from qstar_jax.data.paths import data_dir

__all__ = [
  "TINY_SHAKESPEARE_BYTES",
  "TINY_SHAKESPEARE_URL",
  "tiny_shakespeare_path",
  "load_tiny_shakespeare",
  "split_text",
]

TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_URL = (
  "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)


def tiny_shakespeare_path() -> pathlib.Path:
  """``data_dir()/tinyshakespeare/input.txt``."""
  return data_dir() / "tinyshakespeare" / "input.txt"


def load_tiny_shakespeare(path: str | os.PathLike | None = None, *, verify: bool = True) -> str:
  """The whole corpus as one string (checks the published size unless ``verify=False``)."""
  path = pathlib.Path(path) if path is not None else tiny_shakespeare_path()
  if not path.is_file():
    raise FileNotFoundError(
      f"tiny Shakespeare file {path} not found; set QSTAR_DATA_DIR to a folder holding "
      f"tinyshakespeare/input.txt (download: {TINY_SHAKESPEARE_URL})"
    )
  data = path.read_bytes()
  if verify and len(data) != TINY_SHAKESPEARE_BYTES:
    raise ValueError(
      f"tiny Shakespeare file {path} has {len(data)} bytes, expected {TINY_SHAKESPEARE_BYTES}"
    )
  return data.decode("utf-8")


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
  """First ``1 - val_fraction`` of the characters for training, the rest for validation.

  The cut moves forward to the next line start, so no line is split between the two.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction}: expected a value in (0, 1)")
  cut = int(len(text) * (1.0 - val_fraction))
  newline = text.find("\n", cut)
  if newline != -1:
    cut = newline + 1
  return text[:cut], text[cut:]
