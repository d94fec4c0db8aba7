"""qstar_jax.data: data locations, downloads with checksums, GSM8K, tiny Shakespeare, tfds
builders, grain pipelines.

Settings (environment variables): ``QSTAR_DATA_DIR`` (local data folder), ``QSTAR_CACHE_DIR``
(downloads and prepared datasets), ``QSTAR_GSM8K_URL`` and ``QSTAR_SHAKESPEARE_URL`` (base URLs
of the downloads); see ``qstar_jax.data.download``.

``tfds_builders`` (tensorflow-datasets) is imported on use, not here.
"""

from qstar_jax.data.download import (
  DataChecksumError,
  DataUnavailableError,
  RemoteFile,
  download_file,
  locate_or_download,
  sha256_file,
  verify_file,
)
from qstar_jax.data.gsm8k import load_gsm8k, parse_gsm8k_answer, strip_calculator
from qstar_jax.data.paths import cache_dir, data_dir, data_file
from qstar_jax.data.pipeline import (
  batch_at,
  batch_indices,
  iterate_batches,
  pack_documents,
  pack_tokens,
  read_gsm8k_split,
  read_tiny_shakespeare_splits,
)
from qstar_jax.data.reasoning import (
  PairBatch,
  PairExtraction,
  PreferencePair,
  Trajectory,
  TrajectoryBatch,
  pad_pairs,
  pad_trajectories,
  pair_batches,
  preference_pairs_from_annotations,
  read_reasoning_jsonl,
  split_steps,
  trajectory_batches,
  write_reasoning_jsonl,
)
from qstar_jax.data.text import load_tiny_shakespeare, split_text

__all__ = [
  "DataChecksumError",
  "DataUnavailableError",
  "PairBatch",
  "PairExtraction",
  "PreferencePair",
  "RemoteFile",
  "Trajectory",
  "TrajectoryBatch",
  "batch_at",
  "batch_indices",
  "cache_dir",
  "data_dir",
  "data_file",
  "download_file",
  "iterate_batches",
  "load_gsm8k",
  "load_tiny_shakespeare",
  "locate_or_download",
  "pack_documents",
  "pack_tokens",
  "pad_pairs",
  "pad_trajectories",
  "pair_batches",
  "parse_gsm8k_answer",
  "preference_pairs_from_annotations",
  "read_gsm8k_split",
  "read_reasoning_jsonl",
  "read_tiny_shakespeare_splits",
  "sha256_file",
  "split_steps",
  "split_text",
  "strip_calculator",
  "trajectory_batches",
  "verify_file",
  "write_reasoning_jsonl",
]
