"""experiments.lm_pretrain: learns below the unigram baseline; SIGKILL + rerun resumes exactly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _command(out: pathlib.Path, preset: str = "tiny", *extra: str) -> list[str]:
  return [sys.executable, "-m", "experiments.lm_pretrain", f"preset={preset}", f"out={out}", *extra]


_CACHE = {}


def _env() -> dict:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the command line
  # A persistent compilation cache shared by this module's runs: the reruns skip compiling.
  if "dir" not in _CACHE:
    import tempfile

    _CACHE["dir"] = tempfile.mkdtemp(prefix="qstar_jax_jit_cache_")
  env["JAX_COMPILATION_CACHE_DIR"] = _CACHE["dir"]
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _run(out: pathlib.Path, *extra: str, preset: str = "tiny", timeout: float = 300) -> dict:
  proc = subprocess.run(_command(out, preset, *extra), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads((out / "results.json").read_text())


def _saved_steps(ckpt: pathlib.Path) -> list[int]:
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("lm_full")
  return out, _run(out)


def test_tiny_run_beats_unigram_and_writes_outputs(uninterrupted):
  out, res = uninterrupted
  # The unigram baseline computed independently from the run's own tokenizer and data.
  from experiments.lm_pretrain import LMPretrainConfig, load_splits
  from qstar_jax.data.pipeline import pack_tokens
  from qstar_jax.models.tokenizer import SentencePieceTokenizer
  from qstar_jax.training.config import config_from_dict

  cfg = config_from_dict(LMPretrainConfig, res["config"])
  tok = SentencePieceTokenizer(out / "tokenizer.model")
  train_text, val_text = load_splits(cfg.data)
  assert tok.decode(tok.encode(val_text)) == val_text
  train_ids = np.array(tok.encode(train_text))
  windows = pack_tokens(np.array(tok.encode(val_text)), cfg.data.seq_len)
  targets = windows[: 4 * cfg.data.eval_batch_size, 1:].ravel()
  counts = np.bincount(train_ids, minlength=tok.vocab_size)
  probs = (counts + 1) / (counts.sum() + tok.vocab_size)
  unigram = -np.mean(np.log(probs[targets]))
  assert res["unigram_cross_entropy_val"] == pytest.approx(unigram, rel=1e-9)
  assert res["val_target_tokens_evaluated"] == targets.size
  # Learned context: validation loss well below the unigram cross-entropy.
  assert res["val_loss"] < unigram - 0.5, (res["val_loss"], unigram)
  assert (out / "table.md").read_text().count("|") > 10
  assert (out / "metrics.jsonl").is_file()
  assert _saved_steps(out / "checkpoints")[-1] == res["steps"]


def test_sigkill_and_rerun_resumes_to_same_loss(tmp_path, uninterrupted):
  _, full = uninterrupted
  out = tmp_path / "run"
  proc = subprocess.Popen(_command(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not _saved_steps(out / "checkpoints") and time.time() < deadline:
      assert proc.poll() is None, "run ended before its first checkpoint"
      time.sleep(0.02)
    assert _saved_steps(out / "checkpoints"), "no checkpoint within the deadline"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  killed_at = _saved_steps(out / "checkpoints")[-1]
  assert killed_at < full["steps"] and not (out / "results.json").exists()
  resumed = _run(out)  # the same command again
  assert resumed["resumed_from_step"] == killed_at
  assert resumed["val_loss"] == full["val_loss"]  # identical floats (same machine, same data order)
  assert resumed["final_train_loss"] == full["final_train_loss"]
  steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in line]
  assert steps == sorted(set(steps)) and steps[-1] == full["steps"]


@pytest.mark.slow
def test_cpu_preset(tmp_path):
  res = _run(tmp_path / "cpu", preset="cpu", timeout=1800)
  assert res["val_loss"] < res["unigram_cross_entropy_val"] - 1.0
  assert (tmp_path / "cpu" / "loss_curve.png").stat().st_size > 1000
