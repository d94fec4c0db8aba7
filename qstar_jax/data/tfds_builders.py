"""tensorflow-datasets builders of the project, prepared from local files to array_record.

``Gsm8kLocal`` and ``TinyShakespeareLocal`` read the files under ``data_dir()`` (tfds'
*manual_dir*; when a file is missing there they take the cached copy or download it from its
URL setting, sha256-verified, through ``qstar_jax.data.download``, like the plain loaders).
They are prepared with ``file_format="array_record"`` into ``cache_dir()/tfds`` and read back with
``builder.as_data_source()`` — random access, no TensorFlow import (checked in the tests).

Records (tfds shuffles records on disk, so each carries its position in the original file):
- ``gsm8k_local``: ``{"index": int64, "question": text, "answer": text}``; splits train/test.
- ``tiny_shakespeare_local``: ``{"index": int64, "text": text}`` — consecutive chunks of
  ``CHUNK_CHARS`` characters; splits train (first 90%, cut at a line start) / validation.

``read_gsm8k`` and ``read_tiny_shakespeare`` return the records in file order (the same values
as the plain-file readers in ``gsm8k.py`` / ``text.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from qstar_jax.data import gsm8k as gsm8k_lib
from qstar_jax.data import text as text_lib
from qstar_jax.data.download import RemoteFile, locate_or_download
from qstar_jax.data.paths import cache_dir, data_dir

__all__ = [
  "Gsm8kLocal",
  "TinyShakespeareLocal",
  "prepare_builder",
  "ordered_records",
  "read_gsm8k",
  "read_tiny_shakespeare",
  "CHUNK_CHARS",
]

CHUNK_CHARS = 4096
VAL_FRACTION = 0.1


def _source_file(dl_manager: Any, remote: RemoteFile) -> pathlib.Path:
  """The file in tfds' manual folder when there, else data folder / cache / verified download.

  ``dl_manager.manual_dir`` raises (AssertionError) when the folder is missing or empty, as on
  a fresh machine with no data folder: that case falls through to the download.
  """
  try:
    manual = pathlib.Path(dl_manager.manual_dir) / pathlib.PurePosixPath(remote.relative_path).name
  except (AssertionError, ValueError):
    manual = None
  if manual is not None and manual.is_file():
    return manual
  return locate_or_download(remote)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the project's builders: no checksum file next to the code.

  tfds looks for ``checksums.tsv`` beside a builder's module through ``code_path`` (which needs
  ``importlib_resources`` on some installs); our sources are checked by sha256 or size instead.
  """

  code_path = None


class Gsm8kLocal(_LocalBuilder):
  """GSM8K from ``data_dir()/gsm8k/{train,test}.jsonl`` (sha256-checked)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place train.jsonl and test.jsonl of grade-school-math here."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="GSM8K grade-school math word problems (local files).",
      features=tfds.features.FeaturesDict({
        "index": np.int64,
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
      }),
      homepage="https://github.com/openai/grade-school-math",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    out = {}
    for split in gsm8k_lib.SPLITS:
      path = _source_file(dl_manager, gsm8k_lib.GSM8K_FILES[split])
      gsm8k_lib.verify_gsm8k_file(path, split)
      out[split] = self._generate_examples(path)
    return out

  def _generate_examples(self, path: pathlib.Path):
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f):
        if line.strip():
          row = json.loads(line)
          yield i, {"index": i, "question": row["question"], "answer": row["answer"]}


class TinyShakespeareLocal(_LocalBuilder):
  """Tiny Shakespeare from ``data_dir()/tinyshakespeare/input.txt`` as ordered text chunks."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place input.txt (1,115,394 bytes) here."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Tiny Shakespeare, 90/10 train/validation split by characters.",
      features=tfds.features.FeaturesDict({"index": np.int64, "text": tfds.features.Text()}),
      homepage="https://github.com/karpathy/char-rnn",
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    path = _source_file(dl_manager, text_lib.TINY_SHAKESPEARE_FILE)
    train, val = text_lib.split_text(text_lib.load_tiny_shakespeare(path), VAL_FRACTION)
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, text: str):
    for i, start in enumerate(range(0, len(text), CHUNK_CHARS)):
      yield i, {"index": i, "text": text[start : start + CHUNK_CHARS]}


_MANUAL_SUBDIR = {Gsm8kLocal: "gsm8k", TinyShakespeareLocal: "tinyshakespeare"}


def prepare_builder(
  builder_cls: type,
  *,
  tfds_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
  """Builds (once) the array_record files of ``builder_cls`` and returns the builder.

  Args:
    builder_cls: ``Gsm8kLocal`` or ``TinyShakespeareLocal``.
    tfds_dir: tfds data folder (default ``cache_dir()/tfds``).
    manual_dir: the local source files (default ``data_dir()/<gsm8k|tinyshakespeare>``).
  """
  tfds_dir = pathlib.Path(tfds_dir) if tfds_dir is not None else cache_dir() / "tfds"
  manual_dir = (
    pathlib.Path(manual_dir) if manual_dir is not None else data_dir() / _MANUAL_SUBDIR[builder_cls]
  )
  tfds_dir.mkdir(parents=True, exist_ok=True)
  # Processes sharing a cache (parallel tests, several experiments) prepare one at a time.
  with open(tfds_dir / f".{builder_cls.__name__}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = builder_cls(data_dir=str(tfds_dir), file_format="array_record")
      if not builder.is_prepared():
        tfds.display_progress_bar(False)  # one-off preparation: keep logs short
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
      )
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.generic):
    return value.item()
  return value


def ordered_records(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, Any]]:
  """All records of ``split`` through ``as_data_source()``, sorted by their ``index`` field."""
  source = builder.as_data_source()[split]
  records = [{k: _decode(v) for k, v in source[i].items()} for i in range(len(source))]
  records.sort(key=lambda r: r["index"])
  return records


def read_gsm8k(split: str, **prepare_kwargs: Any) -> list[dict[str, Any]]:
  """GSM8K records through the tfds builder, in file order, parsed like ``load_gsm8k``."""
  builder = prepare_builder(Gsm8kLocal, **prepare_kwargs)
  out = []
  for r in ordered_records(builder, split):
    steps, final = gsm8k_lib.parse_gsm8k_answer(r["answer"])
    out.append(
      {"question": r["question"], "answer": r["answer"], "solution_steps": steps,
       "final_answer": final}
    )
  return out


def read_tiny_shakespeare(split: str, **prepare_kwargs: Any) -> str:
  """The train or validation text through the tfds builder (chunks joined in order)."""
  builder = prepare_builder(TinyShakespeareLocal, **prepare_kwargs)
  return "".join(r["text"] for r in ordered_records(builder, split))
