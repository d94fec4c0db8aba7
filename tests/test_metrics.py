"""Metrics writer (JSONL + TensorBoard), progress summary, phase timer, results writer."""

import json
import math
import time

import pytest

from qstar_jax.training.metrics import MetricsWriter, read_metrics
from qstar_jax.training.progress import PhaseTimer, progress
from qstar_jax.training.results import markdown_table, write_results


def test_jsonl_appends_and_reads_back(tmp_path):
  with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write(1, {"loss": 2.5, "lr": 1e-3})
    w.write(2, {"loss": float("nan")})
  with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:  # reopening appends
    w.write(3, {"loss": 1.25})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  assert json.loads(lines[0])["loss"] == 2.5
  recs = read_metrics(tmp_path)
  assert [r["step"] for r in recs] == [1, 2, 3]
  assert math.isnan(recs[1]["loss"]) and recs[2]["loss"] == 1.25


def test_disabled_writer_writes_nothing(tmp_path):
  w = MetricsWriter(tmp_path / "run", enabled=False)
  w.write(1, {"loss": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_tensorboard_events_readable(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
  from tensorboard.compat.proto.event_pb2 import Event

  with MetricsWriter(tmp_path, enabled=True, tensorboard=True) as w:
    w.write(5, {"loss": 0.5})
    w.write(6, {"loss": 0.25})
  files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  got = []
  for record in RawEventFileLoader(str(files[0])).Load():
    event = Event.FromString(record)
    for v in event.summary.value:
      got.append((event.step, v.tag, v.simple_value))
  assert got == [(5, "loss", 0.5), (6, "loss", 0.25)]


def test_progress_prints_summary_with_rate(capsys):
  total = 0
  for i in progress(range(5), desc="work", unit="step"):
    total += i
  err = capsys.readouterr().err
  assert total == 10
  assert "work: 5 step in" in err and "step/s" in err


def test_phase_timer_accumulates():
  timer = PhaseTimer()
  for _ in range(2):
    with timer.phase("sleep"):
      time.sleep(0.02)
  with timer.phase("other"):
    pass
  s = timer.summary()
  assert list(s) == ["sleep", "other"]
  assert 0.04 <= s["sleep"] < 1.0 and s["other"] < s["sleep"]
  assert timer.counts() == {"sleep": 2, "other": 1}


def test_write_results_nan_safe(tmp_path):
  table = markdown_table(["name", "loss"], [["a", 1.23456], ["b", float("nan")]])
  write_results(tmp_path, results={"loss": float("nan"), "xs": (1, 2)}, table_md=table)
  data = json.loads((tmp_path / "results.json").read_text())
  assert data == {"loss": None, "xs": [1, 2]}
  md = (tmp_path / "table.md").read_text()
  assert "| a | 1.2346 |" in md and md.count("\n") == 4
