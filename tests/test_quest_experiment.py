"""experiments.quest_scaling end to end on a tiny corpus slice, its presets and its table."""

import json
import pathlib

import numpy as np
import pytest

qs = pytest.importorskip("experiments.quest_scaling")

from qstar_jax.models.params import quantized_param_count  # noqa: E402
from qstar_jax.training import quest_runs  # noqa: E402
from qstar_jax.training.config import ConfigError, parse_config  # noqa: E402

RUN_KEYS = {"params", "method", "w_bits", "a_bits", "val_loss", "finite", "steps", "tokens"}


def test_presets_parse():
  for name in ("cpu", "gpu", "smoke"):
    cfg = parse_config(qs.QuestScalingConfig, [f"preset={name}", "out=/tmp/x"],
                       presets_dir=qs.PRESETS)
    assert len(cfg.sizes) >= 1 and all(r in qs.RUN_KINDS for r in cfg.runs)
  cfg = parse_config(qs.QuestScalingConfig, ["preset=cpu"], presets_dir=qs.PRESETS)
  assert [s[0] % 128 for s in cfg.sizes] == [0] * len(cfg.sizes)  # Hadamard block 128
  assert set(cfg.runs) == set(qs.RUN_KINDS)
  with pytest.raises(ConfigError, match="bits"):
    parse_config(qs.QuestScalingConfig, ["bits=3"], presets_dir=qs.PRESETS)


def test_table_reports_gap_to_bf16():
  rows = [
    {"params": 1000, "method": "bf16", "w_bits": None, "a_bits": None, "val_loss": 4.0,
     "finite": True},
    {"params": 1000, "method": "quest", "w_bits": 4, "a_bits": 4, "val_loss": 4.1,
     "finite": True},
    {"params": 1000, "method": "ste", "w_bits": 1, "a_bits": 1, "val_loss": None,
     "finite": False},
  ]
  table = qs.results_table(rows)
  assert "| QuEST W4A4 | 4.1000 (+2.50%) |" in table
  assert "| STE W1A1 | diverged |" in table


def test_quantized_param_count_matches_model():
  import jax
  from flax import nnx

  from qstar_jax.models.llama import Llama

  cfg = parse_config(qs.QuestScalingConfig, ["preset=cpu"], presets_dir=qs.PRESETS)
  mcfg = quest_runs.quest_model_config(cfg, tuple(cfg.sizes[0]), "quest4")
  _, params = nnx.split(Llama(mcfg, rngs=nnx.Rngs(0)))
  flat = jax.tree_util.tree_leaves_with_path(params)
  proj = sum(x.size for path, x in flat if "proj" in jax.tree_util.keystr(path))
  assert quantized_param_count(mcfg) == proj


def test_end_to_end_tiny(tmp_path, monkeypatch):
  from qstar_jax.data.pipeline import read_gsm8k_split, read_tiny_shakespeare_splits

  sh_train, sh_val = read_tiny_shakespeare_splits(backend="files")
  gsm = read_gsm8k_split("test", backend="files")[:20]
  text = "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm)
  monkeypatch.setattr(quest_runs, "corpus_texts", lambda backend: (sh_train[:40000] + text,
                                                                 sh_val[:8000]))
  out = tmp_path / "qs"
  argv = [f"out={out}", "sizes=[[128,256,1,2]]", "runs=[bf16,quest2]", "vocab_size=400",
          "val_sequences=4", "eval_batch_size=2", "train.steps=3", "train.batch_size=2",
          "train.seq_len=32"]
  qs.main(argv)
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["runs"] == ["bf16", "quest2"]
  runs = results["runs"]
  assert [r["method"] for r in runs] == ["bf16", "quest"]
  for r in runs:
    assert set(r) == RUN_KEYS
    assert r["finite"] and r["val_loss"] > 0 and r["steps"] == 3 and r["tokens"] == 3 * 2 * 32
  assert runs[1]["w_bits"] == runs[1]["a_bits"] == 2 and runs[0]["w_bits"] is None
  assert runs[0]["params"] == runs[1]["params"]
  assert "QuEST W2A2" in (out / "table.md").read_text()
  assert (out / "pareto.png").stat().st_size > 0
  assert pathlib.Path(out / "tokenizer" / "spm400.model").is_file()
  # window_losses re-evaluates a run's final checkpoint on every validation window; the
  # recorded val_loss is the mean over the val_sequences evenly spaced ones.
  for r, name in zip(runs, ["bf16", "quest2"], strict=True):
    w = quest_runs.window_losses(out / "runs" / f"d128_f256_l1_{name}")
    assert w.ndim == 1 and len(w) > 4 and np.all(np.isfinite(w))
    pick = np.linspace(0, len(w) - 1, 4).astype(int)
    assert w[pick].mean() == pytest.approx(r["val_loss"], rel=1e-6)
  # quest_seeds --full-val takes each run's loss as the mean over all of its windows.
  from experiments.quest_seeds import load_runs

  windows: dict = {}
  table = load_runs([str(out)], windows=windows)
  full = windows[(runs[1]["params"], "quest2")][0]
  assert table[(runs[1]["params"], "quest2")] == {0: pytest.approx(float(full.mean()))}
  # A rerun reuses the finished runs (no retraining) and writes the same results.
  qs.main(argv)
  assert json.loads((out / "results.json").read_text())["runs"] == runs
  # collect_only gathers finished runs and leaves unfinished ones out, training nothing.
  qs.main([*argv[:1], "sizes=[[128,256,1,2]]", "runs=[bf16,quest2,ste1]", "collect_only=true",
           *argv[3:]])
  assert json.loads((out / "results.json").read_text())["runs"] == runs
  assert not (out / "runs" / "d128_f256_l1_ste1").exists()


def test_bench_quant_cpu_mode_runs(tmp_path):
  bench = pytest.importorskip("experiments.bench_quant")
  out = tmp_path / "bench.json"
  summary = bench.main(["--small", "--out", str(out)])
  qat = summary["qat"]
  assert qat["fp_step_s"] > 0 and qat["qat_step_s"] > 0
  assert qat["qat_over_fp"] == pytest.approx(qat["qat_step_s"] / qat["fp_step_s"])
  assert json.loads(out.read_text())["qat"]["shape"] == qat["shape"]


def test_bench_quant_gpu_sweep_self_test():
  """The GPU sweep script runs end to end on tiny shapes (interpret mode here), checking every
  configuration against its reference before timing it, so a GPU session does not find a
  broken script."""
  bench = pytest.importorskip("experiments.bench_quant")
  summary = bench.main(["--gpu", "--small"])
  w8 = summary["w8a8"]
  assert len(w8["configs"]) == 2
  for row in w8["configs"]:
    assert row["exact_int32"] and row["scaled_rel_err"] <= 1e-6 and row["kernel_s"] > 0
  assert w8["xla_int8_s"] > 0
  for m in ("1", "16"):
    rows = summary["w4a16"]["by_m"][m]["configs"]
    assert len(rows) == 2
    for row in rows:
      assert row["rel_err"] <= 1e-5 and row["kernel_s"] > 0


def test_ordering_checks_by_hand():
  def row(method, bits, loss, finite=True):
    return {"params": 100, "method": method, "w_bits": bits, "a_bits": bits,
            "val_loss": loss if finite else None, "finite": finite}

  rows = [row("bf16", None, 3.00), row("quest", 8, 3.01), row("quest", 4, 3.20),
          row("quest", 3, 3.10), row("quest", 2, 3.30), row("quest", 1, 3.60, finite=False),
          row("ste", 4, 3.25), row("ste", 2, 3.20)]
  checks = {c["claim"]: c for c in qs.ordering_checks(rows)}
  assert checks["W8A8 within 0.5% of BF16"]["holds"] is True  # +0.33%
  assert checks["W8A8 within 0.5% of BF16"]["detail"] == "+0.33%"
  assert checks["W4A4 within 4.0% of BF16"]["holds"] is False  # +6.67%
  # W1A1 diverged: the monotonicity chain cannot be checked; its finiteness claim fails.
  assert checks["loss rises as bits fall"]["holds"] is None
  assert checks["W1A1 finite"]["holds"] is False
  assert checks["QuEST <= STE at 4 bits"]["holds"] is True  # 3.20 vs 3.25
  assert checks["QuEST <= STE at 2 bits"]["holds"] is False  # 3.30 vs 3.20
  assert checks["QuEST <= STE at 1 bit"]["holds"] is None  # no STE W1A1 run
  rows[5] = row("quest", 1, 3.60)
  chain = {c["claim"]: c for c in qs.ordering_checks(rows)}["loss rises as bits fall"]
  assert chain["holds"] is False and chain["detail"] == "W4 3.2000 > W3 3.1000"
  text = qs.ordering_table(rows)
  assert "| QuEST <= STE at 2 bits | FAILS (+0.1000 nats) |" in text
  assert "3 of 7 checks hold" in text  # W8A8, QuEST <= STE at 4, W1A1 finite
