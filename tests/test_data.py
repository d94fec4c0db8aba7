"""Data: GSM8K parsing + checksums, tiny Shakespeare split, tfds builders, grain batching, packing."""

import shutil
import sys

import numpy as np
import pytest

from qstar_jax.data import gsm8k, pipeline, text
from qstar_jax.data.paths import data_dir


def test_gsm8k_splits_and_parsing():
  test = gsm8k.load_gsm8k("test")
  train = gsm8k.load_gsm8k("train")
  assert len(test) == 1319 and len(train) == 7473
  first = test[0]
  assert first["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
  assert first["solution_steps"] == [
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.",
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer\u2019s market.",
  ]
  assert first["final_answer"] == "18"
  assert gsm8k.strip_calculator(first["solution_steps"][0]) == "Janet sells 16 - 3 - 4 = 9 duck eggs a day."
  # every record ends in "#### <final>" and parses to a number
  for rec in train + test:
    assert rec["answer"].rstrip().endswith(rec["answer"].rpartition("####")[2].strip())
    float(rec["final_answer"])
  assert gsm8k.parse_gsm8k_answer("a\nb\n#### 1,234") == (["a", "b"], "1234")
  with pytest.raises(ValueError, match="####"):
    gsm8k.parse_gsm8k_answer("no final line")


def test_gsm8k_checksum_mismatch_is_clear(tmp_path):
  bad = tmp_path / "test.jsonl"
  data = (data_dir() / "gsm8k" / "test.jsonl").read_bytes()
  bad.write_bytes(data.replace(b"#### 18", b"#### 19", 1))
  with pytest.raises(gsm8k.DataChecksumError, match=r"test file .* has sha256 [0-9a-f]{64}, expected 3730d312"):
    gsm8k.load_gsm8k("test", path=bad)
  assert gsm8k.load_gsm8k("test", path=bad, verify=False)[0]["final_answer"] == "19"
  with pytest.raises(FileNotFoundError, match="QSTAR_DATA_DIR"):
    gsm8k.load_gsm8k("test", path=tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="validation"):
    gsm8k.load_gsm8k("validation")


def test_tiny_shakespeare_split():
  corpus = text.load_tiny_shakespeare()
  assert len(corpus.encode()) == text.TINY_SHAKESPEARE_BYTES
  train, val = text.split_text(corpus, 0.1)
  assert train + val == corpus
  assert train.endswith("\n")  # cut at a line start
  assert 0.099 < len(val) / len(corpus) < 0.1


def test_tfds_builders_match_plain_files_without_tensorflow(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from qstar_jax.data import tfds_builders

  train, val = tfds_builders.read_tiny_shakespeare("train", tfds_dir=tmp_path), \
    tfds_builders.read_tiny_shakespeare("validation", tfds_dir=tmp_path)
  assert (train, val) == text.split_text(text.load_tiny_shakespeare(), 0.1)
  assert tfds_builders.read_gsm8k("test", tfds_dir=tmp_path) == gsm8k.load_gsm8k("test")
  files = sorted(p.name for p in (tmp_path / "gsm8k_local" / "1.0.0").iterdir())
  assert any(".array_record-" in f for f in files), files
  source = tfds_builders.prepare_builder(tfds_builders.Gsm8kLocal, tfds_dir=tmp_path).as_data_source()
  assert type(source["train"]).__name__ == "ArrayRecordDataSource" and len(source["train"]) == 7473
  assert "tensorflow" not in sys.modules  # read and prepared with no TensorFlow import


def test_tfds_builder_refuses_corrupted_source(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from qstar_jax.data import tfds_builders

  manual = tmp_path / "manual"
  shutil.copytree(data_dir() / "gsm8k", manual)
  with open(manual / "train.jsonl", "ab") as f:
    f.write(b"\n")
  with pytest.raises(gsm8k.DataChecksumError, match="train file"):
    tfds_builders.prepare_builder(tfds_builders.Gsm8kLocal, tfds_dir=tmp_path / "t", manual_dir=manual)


def test_readers_fallback_when_tfds_missing(monkeypatch):
  files = pipeline.read_tiny_shakespeare_splits(backend="files")
  monkeypatch.setattr(pipeline, "tfds_available", lambda: False)
  assert pipeline.read_tiny_shakespeare_splits(backend="auto") == files
  assert pipeline.read_gsm8k_split("test", backend="auto") == gsm8k.load_gsm8k("test")


def test_batch_indices_are_epoch_permutations():
  n, b = 23, 5
  stream = np.concatenate([
    pipeline.batch_indices(s, batch_size=b, num_examples=n, seed=7) for s in range(3 * n)
  ])  # 3 * 23 batches of 5 = 15 epochs
  for e in range(15):
    assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n : 2 * n])  # epochs reshuffle
  assert not np.array_equal(stream[:n], np.arange(n))
  again = pipeline.batch_indices(4, batch_size=b, num_examples=n, seed=7)
  np.testing.assert_array_equal(again, stream[20:25])
  other = pipeline.batch_indices(4, batch_size=b, num_examples=n, seed=8)
  assert not np.array_equal(other, again)
  plain = pipeline.batch_indices(5, batch_size=b, num_examples=n, seed=7, shuffle=False)
  np.testing.assert_array_equal(plain, [2, 3, 4, 5, 6])  # positions 25..29 mod 23


def test_grain_and_python_give_same_batches_and_resume():
  windows = pipeline.pack_tokens(np.arange(500), 9)
  py = list(pipeline.iterate_batches(windows, batch_size=4, seed=1, num_steps=30, backend="python"))
  if pipeline.grain_available():
    gr = list(pipeline.iterate_batches(windows, batch_size=4, seed=1, num_steps=30, backend="grain"))
    assert len(gr) == 30
    for x, y in zip(py, gr, strict=True):
      np.testing.assert_array_equal(x, y)
  resumed = list(pipeline.iterate_batches(windows, batch_size=4, seed=1, start_step=17, num_steps=13))
  for x, y in zip(py[17:], resumed, strict=True):
    np.testing.assert_array_equal(x, y)
  endless = pipeline.iterate_batches(windows, batch_size=4, seed=1, start_step=29)
  np.testing.assert_array_equal(next(endless), py[29])
  shards = [next(pipeline.iterate_batches(windows, batch_size=4, seed=1, start_step=5, shard=(i, 2)))
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(shards), py[5])  # process shards tile the batch
  dict_src = [{"x": np.array([i]), "y": np.array(2 * i)} for i in range(10)]
  batch = pipeline.batch_at(dict_src, 0, batch_size=3, seed=0, shuffle=False)
  np.testing.assert_array_equal(batch["x"], [[0], [1], [2]])
  np.testing.assert_array_equal(batch["y"], [0, 2, 4])


def test_pack_tokens_and_documents():
  w = pipeline.pack_tokens(np.arange(11), 3)
  np.testing.assert_array_equal(w, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
  assert w.dtype == np.int32
  np.testing.assert_array_equal(pipeline.pack_tokens(np.arange(9), 3, overlap=False),
                                [[0, 1, 2, 3], [4, 5, 6, 7]])
  d = pipeline.pack_documents([[5, 6], [7], [8, 9, 10]], 2, eos_id=0)
  # stream 5 6 0 7 0 8 9 10 0 (9 tokens) -> 4 windows of 3 sharing boundaries
  np.testing.assert_array_equal(d, [[5, 6, 0], [0, 7, 0], [0, 8, 9], [9, 10, 0]])
  with pytest.raises(ValueError, match="too short"):
    pipeline.pack_tokens(np.arange(3), 3)
