"""GSM8K (grade-school math): JSONL files, checksum-verified, parsed into steps.

The files are read from ``data_dir()/gsm8k/{train,test}.jsonl`` when present, else from the
cache, else downloaded from ``QSTAR_GSM8K_URL`` (default: the public grade-school-math folder)
and checked against their published sha256 (see ``qstar_jax.data.download``).

Each record of ``load_gsm8k(split)``::

  {"question": str,                 # the problem text
   "answer": str,                   # the worked solution as distributed (steps + "#### N")
   "solution_steps": list[str],     # the solution lines before "####", calculator
                                    # annotations "<<48/2=24>>" kept (see strip_calculator)
   "final_answer": str}             # the text after "####", commas removed ("1,000" -> "1000")
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

from qstar_jax.data.download import (
  DataChecksumError,
  RemoteFile,
  resolve_file,
  sha256_file,
  verify_file,
)

__all__ = [
  "GSM8K_FILES",
  "GSM8K_SHA256",
  "GSM8K_SIZES",
  "GSM8K_URLS",
  "GSM8K_URL_SETTING",
  "DataChecksumError",
  "load_gsm8k",
  "parse_gsm8k_answer",
  "strip_calculator",
  "gsm8k_path",
  "sha256_file",
  "verify_gsm8k_file",
]

SPLITS = ("train", "test")
GSM8K_SHA256 = {
  "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
  "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
}
GSM8K_SIZES = {"train": 7473, "test": 1319}
GSM8K_URL_SETTING = "QSTAR_GSM8K_URL"
GSM8K_BASE_URL = (
  "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
)
GSM8K_URLS = {s: f"{GSM8K_BASE_URL}/{s}.jsonl" for s in SPLITS}  # the public URLs (defaults)
GSM8K_FILES = {
  s: RemoteFile(
    name=f"GSM8K {s}",
    relative_path=f"gsm8k/{s}.jsonl",
    sha256=GSM8K_SHA256[s],
    url_setting=GSM8K_URL_SETTING,
    default_base_url=GSM8K_BASE_URL,
    description=f"grade-school-math {s}.jsonl, {GSM8K_SIZES[s]:,} problems",
  )
  for s in SPLITS
}

_CALC = re.compile(r"<<[^>]*>>")


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"GSM8K split {split!r}: expected one of {SPLITS}")


def gsm8k_path(split: str) -> pathlib.Path:
  """``data_dir()/gsm8k/{split}.jsonl`` (may not exist; ``load_gsm8k`` then uses the cache)."""
  _check_split(split)
  return GSM8K_FILES[split].local_path()


def verify_gsm8k_file(path: str | os.PathLike, split: str) -> None:
  """Raises DataChecksumError naming the file and both digests when the sha256 differs."""
  _check_split(split)
  verify_file(path, GSM8K_FILES[split])


def strip_calculator(text: str) -> str:
  """Removes calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
  return _CALC.sub("", text)


def parse_gsm8k_answer(answer: str) -> tuple[list[str], str]:
  """Splits a GSM8K solution into its step lines and the final answer after ``####``.

  >>> parse_gsm8k_answer("It takes 2/2=<<2/2=1>>1 bolt\\nSo 2+1=<<2+1=3>>3\\n#### 3")
  (['It takes 2/2=<<2/2=1>>1 bolt', 'So 2+1=<<2+1=3>>3'], '3')
  """
  if "####" not in answer:
    raise ValueError(f"GSM8K answer has no '#### <final answer>' line: {answer[-80:]!r}")
  body, _, final = answer.rpartition("####")
  steps = [line.strip() for line in body.split("\n") if line.strip()]
  return steps, final.strip().replace(",", "")


def _record(row: dict[str, Any], where: str) -> dict[str, Any]:
  if not isinstance(row, dict) or "question" not in row or "answer" not in row:
    raise ValueError(f"{where}: expected an object with 'question' and 'answer'")
  steps, final = parse_gsm8k_answer(row["answer"])
  return {
    "question": row["question"],
    "answer": row["answer"],
    "solution_steps": steps,
    "final_answer": final,
  }


def load_gsm8k(
  split: str, *, path: str | os.PathLike | None = None, verify: bool = True
) -> list[dict[str, Any]]:
  """Loads a GSM8K split (``"train"`` 7,473 or ``"test"`` 1,319 problems) in file order.

  Args:
    split: ``"train"`` or ``"test"``.
    path: a JSONL file (default ``data_dir()/gsm8k/{split}.jsonl``, else the cached copy,
      else a verified download into the cache).
    verify: check the file's sha256 against the published value.

  Raises:
    FileNotFoundError: ``path`` given and absent (names it and QSTAR_DATA_DIR).
    DataUnavailableError: no local or cached copy and the download failed (names
      QSTAR_DATA_DIR, the path, the URL and QSTAR_GSM8K_URL).
    DataChecksumError: sha256 mismatch (names both digests).
  """
  _check_split(split)
  path = resolve_file(GSM8K_FILES[split], path, verify=verify)
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        out.append(_record(json.loads(line), f"{path}:{i + 1}"))
  return out
