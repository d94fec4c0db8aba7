"""Tiny Shakespeare: the character-level LM corpus (1,115,394 bytes), checksum-verified.

Read from ``data_dir()/tinyshakespeare/input.txt`` when present, else from the cache, else
downloaded from ``QSTAR_SHAKESPEARE_URL`` (default: the char-rnn folder on GitHub) and checked
against its sha256 (see ``qstar_jax.data.download``).
"""

from __future__ import annotations

import os
import pathlib

from qstar_jax.data.download import RemoteFile, resolve_file

__all__ = [
  "TINY_SHAKESPEARE_BYTES",
  "TINY_SHAKESPEARE_FILE",
  "TINY_SHAKESPEARE_SHA256",
  "TINY_SHAKESPEARE_URL",
  "TINY_SHAKESPEARE_URL_SETTING",
  "tiny_shakespeare_path",
  "load_tiny_shakespeare",
  "split_text",
]

TINY_SHAKESPEARE_BYTES = 1_115_394
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_URL_SETTING = "QSTAR_SHAKESPEARE_URL"
TINY_SHAKESPEARE_BASE_URL = (
  "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare"
)
TINY_SHAKESPEARE_URL = f"{TINY_SHAKESPEARE_BASE_URL}/input.txt"  # the public URL (default)
TINY_SHAKESPEARE_FILE = RemoteFile(
  name="tiny Shakespeare",
  relative_path="tinyshakespeare/input.txt",
  sha256=TINY_SHAKESPEARE_SHA256,
  url_setting=TINY_SHAKESPEARE_URL_SETTING,
  default_base_url=TINY_SHAKESPEARE_BASE_URL,
  description=f"char-rnn tinyshakespeare/input.txt, {TINY_SHAKESPEARE_BYTES:,} bytes",
)


def tiny_shakespeare_path() -> pathlib.Path:
  """``data_dir()/tinyshakespeare/input.txt`` (may not exist; the loader then uses the cache)."""
  return TINY_SHAKESPEARE_FILE.local_path()


def load_tiny_shakespeare(path: str | os.PathLike | None = None, *, verify: bool = True) -> str:
  """The whole corpus as one string.

  Args:
    path: the file (default ``data_dir()/tinyshakespeare/input.txt``, else the cached copy,
      else a verified download into the cache).
    verify: check the file's sha256 (DataChecksumError on a mismatch).
  """
  return resolve_file(TINY_SHAKESPEARE_FILE, path, verify=verify).read_bytes().decode("utf-8")


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
