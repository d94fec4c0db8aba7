"""experiments.train_value: SIGKILL + rerun ends with the uninterrupted run's parameters; a NaN
loss stops naming its step with the last good checkpoint kept; bad input is refused."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import train_value
from qstar_jax.data.reasoning import PreferencePair, write_reasoning_jsonl
from qstar_jax.envs.arithmetic import generate_problems, policy_prompt
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy
from qstar_jax.training.train_loop import NonFiniteLossError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _wrong(line: str) -> str:
  """The step with its result off by one: '12 + 7 = 19' -> '12 + 7 = 20'."""
  left, result = line.rsplit("= ", 1)
  return f"{left}= {int(result) + 1}"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
  """Step pairs on train problems: chosen = the first correct step, rejected = it off by one."""
  policy = load_arithmetic_policy()
  tok = policy.tokenizer
  pairs = []
  for p in generate_problems(5, 24, split="train"):
    first = p.solution.splitlines()[0]
    pairs.append(PreferencePair(
      context_ids=tuple(policy.prompt_ids(policy_prompt(p.question))),
      chosen_ids=tuple(tok.encode(first + "\n")), rejected_ids=tuple(tok.encode(_wrong(first)
                                                                                + "\n")),
      chosen_q=1.0, rejected_q=0.0))
  return write_reasoning_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", pairs)


def _command(out, data, *extra):
  return [sys.executable, "-m", "experiments.train_value", "preset=tiny", "method=step_dpo",
          f"data={data}", f"out={out}", *extra]


def _env():
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.pop("XLA_FLAGS", None)
  return env


def _saved(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_sigkill_and_rerun_end_with_the_uninterrupted_parameters(pairs_file, tmp_path):
  full = subprocess.run(_command(tmp_path / "full", pairs_file), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  full_res = json.loads((tmp_path / "full" / "results.json").read_text())
  assert full_res["resumed_from_step"] is None and full_res["steps"] == 12

  out = tmp_path / "killed"
  proc = subprocess.Popen(_command(out, pairs_file), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not _saved(out / "run" / "checkpoints") and time.time() < deadline:
      assert proc.poll() is None, "run ended before its first checkpoint"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  killed_at = _saved(out / "run" / "checkpoints")[-1]
  assert killed_at < 12 and not (out / "results.json").exists()

  rerun = subprocess.run(_command(out, pairs_file), cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  res = json.loads((out / "results.json").read_text())
  assert res["resumed_from_step"] == killed_at
  assert res["params_digest"] == full_res["params_digest"]
  assert res["final_train_loss"] == full_res["final_train_loss"]
  a, b = np.load(tmp_path / "full" / "model" / "params.npz"), np.load(out / "model" / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])
  # the trained Q-model moved away from its reference (the committed policy)
  ref = np.load(load_arithmetic_policy().path / "params.npz")
  assert any(not np.array_equal(a[n], ref[n]) for n in a.files if n.startswith("policy."))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(pairs_file, tmp_path):
  argv = ["preset=tiny", "method=step_dpo", f"data={pairs_file}", f"out={tmp_path}",
          "run.checkpoint_every=1", "run.log_every=1", "run.optim.lr=1e30",
          "run.optim.warmup_steps=0"]
  with pytest.raises(NonFiniteLossError, match=r"at step \d+; .*last good checkpoint is step "
                     r"\d+") as e:
    train_value.main(argv)
  saved = _saved(tmp_path / "run" / "checkpoints")
  assert e.value.last_good_checkpoint == saved[-1] < e.value.step
  assert not (tmp_path / "results.json").exists()


def test_bad_input_is_refused(pairs_file, tmp_path):
  with pytest.raises(ValueError, match="method='ppo': expected one of"):
    train_value.main(["method=ppo", f"data={pairs_file}", f"out={tmp_path}"])
  with pytest.raises(ValueError, match="data= is empty"):
    train_value.main([f"out={tmp_path}"])
  same = tmp_path / "same.jsonl"
  write_reasoning_jsonl(same, [PreferencePair(context_ids=(1, 5), chosen_ids=(7, 4),
                                              rejected_ids=(7, 4), chosen_q=1.0,
                                              rejected_q=0.0)])
  with pytest.raises(ValueError, match=r"pairs\[0\] has identical chosen and rejected ids"):
    train_value.main(["method=step_dpo", f"data={same}", f"out={tmp_path}"])
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="no preference pairs"):
    train_value.main(["method=step_dpo", f"data={empty}", f"out={tmp_path}"])
