"""QuEST bits-vs-loss table in miniature: Llama LMs of three sizes trained at 1-8 / 16 bits.

  python -m experiments.quest_scaling preset=cpu out=runs/quest_scaling
  python -m experiments.quest_scaling preset=gpu out=runs/quest_scaling_gpu

For each model size and each precision (BF16; QuEST W8A8, W4A4, W3A3, W2A2, W1A1; STE W4A4,
W2A2, W1A1 on the same Hadamard + Gaussian grid, identity gradient) it trains a Llama-style LM
from the same initialisation on the same batches (tiny Shakespeare + GSM8K text, a
SentencePiece tokenizer trained here on the training text) and records the final validation
loss. Writes:

  out/results.json  {"config": {...}, "runs": [{"params", "method", "w_bits", "a_bits",
                     "val_loss", "finite", "steps", "tokens"}, ...]}
  out/table.md      val loss per size x precision, the gap to BF16 in percent, and which of
                    the paper's ordering claims hold at each size
  out/pareto.png    val loss vs model size in bits (the paper's Pareto view)
  out/runs/<size>_<run>/  metrics.jsonl, checkpoints (a rerun resumes / skips finished runs)

Runs of one table can be spread over processes or machines (`runs=[...]`, `sizes=[...]` into
separate out dirs); copy their `runs/*` folders into one out dir and rerun the full command
with `collect_only=true` to assemble results.json, table.md and the plot without training.

"bf16" is the full-precision baseline: on the CPU preset its compute dtype is float32 (bf16
matmuls are emulated and slow on CPUs), on accelerators bfloat16.

Devices: `mesh=` ("" = all devices on data; e.g. `mesh=fsdp=8`) shards every run's model by
`qstar_jax.distributed`'s rules and splits its batches over data x fsdp (`train.batch_size` and
`eval_batch_size` must divide over them); `runtime.*` sets the compilation cache and the
multi-host start. On several hosts each reads its rows of every batch and process 0 writes; a
run resumes on another mesh.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.data.pipeline import process_rows
from qstar_jax.distributed import data_shard
from qstar_jax.models.llama import Llama
from qstar_jax.models.params import count_params, quantized_param_count
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.lm import lm_loss_fn
from qstar_jax.training.optim import lr_schedule, make_optimizer
from qstar_jax.training.quest_runs import (
  RUN_KINDS,
  QuestScalingConfig,
  optimizer_config,
  prepare_data,
  quest_model_config,
)
from qstar_jax.training.results import (
  markdown_table,
  new_figure,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.run_setup import check_batch_sizes, mesh_ignore_keys, setup_run
from qstar_jax.training.train_loop import TrainLoopConfig, train

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "quest_scaling"


# ------------------------------------------------------------------------------------ runs


def train_one(cfg: QuestScalingConfig, size, run: str, steps: int, train_windows, val_windows,
              run_dir: pathlib.Path, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """Trains one (size, precision) model (on ``mesh``; None: one device); returns its
  results.json row (+ "size_bits")."""
  done_file = run_dir / "result.json"
  if done_file.is_file():
    return json.loads(done_file.read_text())
  mcfg = quest_model_config(cfg, size, run)
  ts = cfg.train
  # Same initialisation for every precision of a size: rngs from the seed only.
  model = Llama(mcfg, rngs=nnx.Rngs(ts.seed))
  graphdef, params = nnx.split(model)
  loss_fn = lm_loss_fn(graphdef)
  ocfg = optimizer_config(ts, steps)
  optimizer = make_optimizer(ocfg, total_steps=steps)
  b = ts.batch_size
  shard = data_shard()  # several processes: each takes its rows of every global batch

  def train_batches(start_step):
    step = start_step
    while True:
      rng = np.random.default_rng([ts.seed, step])
      idx = rng.integers(0, len(train_windows), size=b)
      yield process_rows(train_windows[idx], shard)
      step += 1

  eb = cfg.eval_batch_size

  def eval_batches():
    for i in range(0, len(val_windows) - eb + 1, eb):
      yield process_rows(val_windows[i:i + eb], shard)

  method, w_bits, a_bits = RUN_KINDS[run]
  run_config = {"experiment": config_to_dict(cfg), "size": list(size), "run": run,
                "steps": steps}
  t0 = time.time()
  finite = True
  val_loss = float("nan")
  try:
    result = train(
      loss_fn, params, optimizer=optimizer, train_batches=train_batches,
      config=TrainLoopConfig(num_steps=steps, eval_every=0, checkpoint_every=0,
                             log_every=10, seed=ts.seed),
      out_dir=run_dir, run_config=run_config, eval_batches=eval_batches,
      eval_loss_fn=lambda p, batch: loss_fn(p, batch),
      lr_fn=lr_schedule(ocfg, total_steps=steps),
      ignore_config_keys=mesh_ignore_keys("experiment"), mesh=mesh,
    )
    val_loss = float(result.eval_history[-1][1]["loss"])
    finite = bool(np.isfinite(val_loss))
  except FloatingPointError as e:  # the loop stops on a non-finite training loss
    print(f"{run_dir.name}: {e}", flush=True)
    finite = False
  n_params = count_params(params)
  n_quant = quantized_param_count(mcfg)
  bits = 16 if w_bits is None else w_bits
  row = {
    "params": n_params, "method": method, "w_bits": w_bits, "a_bits": a_bits,
    "val_loss": val_loss if finite else None, "finite": finite, "steps": steps,
    "tokens": steps * b * ts.seq_len,
    "size_bits": n_quant * bits + (n_params - n_quant) * 16,
    "seconds": round(time.time() - t0, 1),
  }
  return write_json(done_file, row)


# --------------------------------------------------------------------------------- outputs


def _label(row) -> str:
  if row["method"] == "bf16":
    return "BF16"
  return f"{'QuEST' if row['method'] == 'quest' else 'STE'} W{row['w_bits']}A{row['a_bits']}"


def results_table(rows: list[dict[str, Any]]) -> str:
  sizes = sorted({r["params"] for r in rows})
  labels = []
  for r in rows:
    if _label(r) not in labels:
      labels.append(_label(r))
  base = {r["params"]: r["val_loss"] for r in rows if r["method"] == "bf16"}
  table_rows = []
  for lab in labels:
    cells = [lab]
    for n in sizes:
      match = [r for r in rows if r["params"] == n and _label(r) == lab]
      if not match:
        cells.append("-")
        continue
      r = match[0]
      if not r["finite"] or r["val_loss"] is None:
        cells.append("diverged")
      elif base.get(n) and lab != "BF16":
        cells.append(f"{r['val_loss']:.4f} ({100 * (r['val_loss'] / base[n] - 1):+.2f}%)")
      else:
        cells.append(f"{r['val_loss']:.4f}")
    table_rows.append(cells)
  headers = ["precision"] + [f"{n / 1e6:.2f}M params" for n in sizes]
  return ("Final validation loss (nats/token), gap to BF16 in parentheses.\n\n"
          + markdown_table(headers, table_rows))


def ordering_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The paper's ordering, claim by claim and size by size, on finished runs.

  Claims (issue 4's acceptance): W8A8 within 0.5% of BF16; W4A4 within 4%; QuEST loss rising
  monotonically as bits fall (BF16, 8, 4, 3, 2, 1); QuEST <= STE at 4, 2 and 1 bits; 1-bit runs
  finite to the end. Returns [{"claim", "params", "holds": bool | None, "detail"}]; holds is
  None when a run the claim needs is missing (or diverged, for claims about its loss).
  """
  checks = []
  for n in sorted({r["params"] for r in rows}):
    by = {(r["method"], r["w_bits"]): r for r in rows if r["params"] == n}

    def loss(method, bits, by=by):
      r = by.get((method, bits))
      return r["val_loss"] if r and r["finite"] and r["val_loss"] is not None else None

    def add(claim, holds, detail, n=n):
      checks.append({"claim": claim, "params": n, "holds": holds, "detail": detail})

    base = loss("bf16", None)
    for bits, limit in ((8, 0.5), (4, 4.0)):
      claim = f"W{bits}A{bits} within {limit}% of BF16"
      q = loss("quest", bits)
      if base is None or q is None:
        add(claim, None, "run missing")
      else:
        gap = 100 * (q / base - 1)
        add(claim, gap <= limit, f"{gap:+.2f}%")
    chain = [("BF16", base)] + [(f"W{b}", loss("quest", b)) for b in (8, 4, 3, 2, 1)]
    if any(v is None for _, v in chain):
      add("loss rises as bits fall", None, "run missing")
    else:
      breaks = [f"{a} {x:.4f} > {b} {y:.4f}"
                for (a, x), (b, y) in zip(chain[:-1], chain[1:], strict=True) if x > y]
      add("loss rises as bits fall", not breaks, "; ".join(breaks) or "monotone")
    for bits in (4, 2, 1):
      claim = f"QuEST <= STE at {bits} bit{'s' if bits > 1 else ''}"
      q, t = loss("quest", bits), loss("ste", bits)
      if q is None or t is None:
        add(claim, None, "run missing")
      else:
        add(claim, q <= t, f"{q - t:+.4f} nats")
    one = by.get(("quest", 1))
    add("W1A1 finite", None if one is None else bool(one["finite"]),
        "run missing" if one is None else ("finite" if one["finite"] else "diverged"))
  return checks


def ordering_table(rows: list[dict[str, Any]]) -> str:
  """`ordering_checks` as markdown: one row per claim, one column per size."""
  checks = ordering_checks(rows)
  sizes = sorted({c["params"] for c in checks})
  claims = list(dict.fromkeys(c["claim"] for c in checks))
  mark = {True: "holds", False: "FAILS", None: "n/a"}
  cells = {(c["claim"], c["params"]): f"{mark[c['holds']]} ({c['detail']})" for c in checks}
  table_rows = [[claim] + [cells.get((claim, n), "-") for n in sizes] for claim in claims]
  held = sum(c["holds"] is True for c in checks)
  return (f"The paper's ordering, per size: {held} of {len(checks)} checks hold (one seed; "
          "see experiments.quest_seeds for the spread over seeds).\n\n"
          + markdown_table(["claim"] + [f"{n / 1e6:.2f}M params" for n in sizes], table_rows))


def pareto_plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  fig, ax = new_figure(figsize=(6, 4))
  labels = []
  for r in rows:
    if _label(r) not in labels:
      labels.append(_label(r))
  for lab in labels:
    pts = sorted((r["size_bits"], r["val_loss"]) for r in rows
                 if _label(r) == lab and r["finite"] and r["val_loss"] is not None)
    if pts:
      xs, ys = zip(*pts, strict=True)
      ax.plot(xs, ys, "o--" if lab.startswith("STE") else "o-", label=lab)
  ax.set_xscale("log")
  from matplotlib.ticker import NullFormatter

  ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap at this width
  ax.set_xlabel("model size in bits (quantized projections at w_bits, the rest 16-bit)")
  ax.set_ylabel("validation loss")
  ax.set_title("QuEST: loss vs model size in bits")
  ax.legend(fontsize=7)
  save_plot(fig, path)


def batch_sizes(cfg: QuestScalingConfig) -> dict[str, int]:
  """The global batch sizes the mesh must divide, by config key (none when only collecting)."""
  if cfg.collect_only:
    return {}
  return {"train.batch_size": cfg.train.batch_size, "eval_batch_size": cfg.eval_batch_size}


def run_experiment(cfg: QuestScalingConfig, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """The table of ``cfg`` into ``cfg.out``; ``mesh``: the runs' device mesh (None: one device;
  ``main`` passes the mesh of ``cfg.mesh``)."""
  if mesh is not None:  # before any data: the error names the config key
    check_batch_sizes(mesh, batch_sizes(cfg))
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  unknown = [r for r in cfg.runs if r not in RUN_KINDS]
  if unknown:
    raise ValueError(f"unknown runs {unknown}: expected names from {list(RUN_KINDS)}")
  if cfg.steps_per_size and len(cfg.steps_per_size) != len(cfg.sizes):
    raise ValueError(f"steps_per_size={cfg.steps_per_size} must list one count per size "
                     f"({len(cfg.sizes)} sizes)")
  t0 = time.time()
  if cfg.collect_only:
    train_windows = val_windows = None
  else:
    _, train_windows, val_windows = prepare_data(cfg, out)
    print(f"data: {len(train_windows)} train windows, {len(val_windows)} val windows "
          f"({time.time() - t0:.0f}s)", flush=True)
  rows = []
  results = {"config": config_to_dict(cfg), "runs": rows}
  for si, size in enumerate(cfg.sizes):
    steps = cfg.steps_per_size[si] if cfg.steps_per_size else cfg.train.steps
    for run in cfg.runs:
      name = f"d{size[0]}_f{size[1]}_l{size[2]}_{run}"
      if cfg.collect_only:
        done = out / "runs" / name / "result.json"
        if not done.is_file():
          print(f"{name}: not finished, left out", flush=True)
          continue
        row = json.loads(done.read_text())
      else:
        row = train_one(cfg, tuple(size), run, steps, train_windows, val_windows,
                        out / "runs" / name, mesh=mesh)
      rows.append(row)
      loss = row["val_loss"]
      print(f"[{time.time() - t0:7.0f}s] {name}: params={row['params']} val_loss="
            f"{'diverged' if loss is None else f'{loss:.4f}'}", flush=True)
      public = [{k: r[k] for k in ("params", "method", "w_bits", "a_bits", "val_loss",
                                   "finite", "steps", "tokens")} for r in rows]
      write_results(out, results={"config": results["config"], "runs": public},
                    table_md=results_table(rows) + "\n" + ordering_table(rows))
  if not rows:
    raise RuntimeError(f"no finished runs under {out / 'runs'}")
  pareto_plot(rows, out / "pareto.png")
  print(f"done in {time.time() - t0:.0f}s: {out / 'results.json'}", flush=True)
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(QuestScalingConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  mesh = setup_run(cfg.mesh, cfg.runtime, batch_sizes=batch_sizes(cfg))
  return run_experiment(cfg, mesh=mesh)


if __name__ == "__main__":
  main()
