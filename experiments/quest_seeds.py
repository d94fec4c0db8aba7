"""Seed spread of `quest_scaling` runs: per-seed losses, means and paired gaps.

  python -m experiments.quest_seeds DIR [DIR ...] [--full-val] [--trajectory] [--out FILE.md]

Each DIR is the `out` of one `python -m experiments.quest_scaling ... train.seed=S` call (the seed
is read from DIR/results.json). Runs of the same size and precision from different seeds are
grouped. Because every
precision of one seed starts from the same initialisation and sees the same batches, gaps are
paired per seed: `gap(run) = loss(run, seed) / loss(BF16, seed) - 1`, and `QuEST - STE` at equal
bits is `loss(quest, seed) - loss(ste, seed)`. Prints (and with --out writes) a markdown table.

`--full-val` re-evaluates every run's final checkpoint on all validation windows (the table's
`val_loss` uses `val_sequences` of them) and pairs QuEST with STE window by window: next to the
spread over seeds it then reports the evaluation's own standard error (per-window sd / sqrt(n)),
which says how much of a gap is measurement and how much is the training seed.

`--trajectory` shows when the paired gaps form: the training-loss difference of two runs of one
seed (W8A8 - BF16, and QuEST - STE at equal bits) on the identical batches, averaged over
equal segments of training, beside the final validation difference.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from collections import defaultdict

import numpy as np

from qstar_jax.training.quest_runs import RUN_KINDS, window_losses
from qstar_jax.training.results import markdown_table


def finished_runs(out_dir: str | pathlib.Path
                  ) -> tuple[int, list[tuple[str, str, pathlib.Path]]]:
  """(seed, [(size prefix, run name, run dir), ...]) of one quest_scaling `out` directory:
  its runs with a result.json, in name order."""
  root = pathlib.Path(out_dir)
  results = root / "results.json"
  if not results.is_file():
    raise FileNotFoundError(f"{results} does not exist: expected the out dir of a finished "
                            f"quest_scaling run")
  seed = int(json.loads(results.read_text())["config"]["train"]["seed"])
  runs = []
  for done in sorted(root.glob("runs/*/result.json")):
    size, run = done.parent.name.rsplit("_", 1)
    if run not in RUN_KINDS:
      raise ValueError(f"{done}: run name {run!r} is not one of {list(RUN_KINDS)}")
    runs.append((size, run, done.parent))
  return seed, runs


def load_runs(dirs: list[str], *, windows: dict | None = None
              ) -> dict[tuple[int, str], dict[int, float]]:
  """{(params, run name): {seed: val_loss}} over the finished runs of `dirs`.

  With a dict `windows`, also re-evaluates each run on every validation window
  (`qstar_jax.training.quest_runs.window_losses`), fills `windows[(params, run)][seed]` with the
  per-window losses and uses their mean as the run's loss.
  """
  table: dict[tuple[int, str], dict[int, float]] = defaultdict(dict)
  for d in dirs:
    seed, runs = finished_runs(d)
    for _, run, run_dir in runs:
      done = run_dir / "result.json"
      row = json.loads(done.read_text())
      if not row["finite"] or row["val_loss"] is None:
        continue
      if seed in table[(row["params"], run)]:
        raise ValueError(f"{done}: seed {seed} of {run} at {row['params']} params appears twice")
      if windows is None:
        table[(row["params"], run)][seed] = float(row["val_loss"])
      else:
        losses = window_losses(run_dir)
        windows.setdefault((row["params"], run), {})[seed] = losses
        table[(row["params"], run)][seed] = float(losses.mean())
  if not table:
    raise ValueError(f"no finished runs under {dirs}")
  return table


def _mean_sd(xs: list[float], digits: int = 2) -> str:
  if len(xs) == 1:
    return f"{xs[0]:+.{digits}f}"
  return f"{statistics.mean(xs):+.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def seed_table(table: dict[tuple[int, str], dict[int, float]], windows: dict | None = None
               ) -> str:
  rows = []
  for params in sorted({p for p, _ in table}):
    base = table.get((params, "bf16"), {})
    for run in RUN_KINDS:
      losses = table.get((params, run))
      if not losses:
        continue
      seeds = sorted(losses)
      per_seed = ", ".join(f"{losses[s]:.4f}" for s in seeds)
      paired = [s for s in seeds if s in base]
      gap = (_mean_sd([100 * (losses[s] / base[s] - 1) for s in paired]) + "%"
             if run != "bf16" and paired else "-")
      vs_ste = "-"
      method, bits, _ = RUN_KINDS[run]
      ste = table.get((params, f"ste{bits}")) if method == "quest" else None
      if ste:
        both = [s for s in seeds if s in ste]
        diffs = [losses[s] - ste[s] for s in both]
        wins = sum(d <= 0 for d in diffs)
        vs_ste = f"{_mean_sd(diffs, 4)} (QuEST <= STE in {wins}/{len(diffs)})"
        if windows:
          # Evaluation error of each seed's paired gap: sd of the per-window differences / sqrt(n).
          q, t = windows[(params, run)], windows[(params, f"ste{bits}")]
          se = max(float(np.std(q[s] - t[s], ddof=1) / np.sqrt(len(q[s]))) for s in both)
          vs_ste += f"; eval SE <= {se:.4f}"
      rows.append([f"{params / 1e6:.2f}M", run, ", ".join(map(str, seeds)), per_seed,
                   f"{statistics.mean(losses.values()):.4f}", gap, vs_ste])
  return markdown_table(["size", "run", "seeds", "val loss per seed", "mean",
                         "gap to BF16, paired (mean ± sd)", "QuEST - STE, paired (nats)"], rows)


def train_losses(run_dir: pathlib.Path) -> np.ndarray:
  """The run's training loss per step (metrics.jsonl's "train/loss", in step order; a step
  logged twice, as after a resumed run, counts once with its last value)."""
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]
  by_step = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  return np.array([by_step[t] for t in sorted(by_step)], np.float64)


def _trajectory_pairs(runs: dict[str, pathlib.Path]) -> list[tuple[str, str]]:
  pairs = [("quest8", "bf16")] if {"quest8", "bf16"} <= runs.keys() else []
  for run, (method, bits, _) in RUN_KINDS.items():
    if method == "quest" and run in runs and f"ste{bits}" in runs:
      pairs.append((run, f"ste{bits}"))
  return pairs


def trajectory_table(dirs: list[str], segments: int = 8) -> str:
  """Paired training-loss gaps per seed, averaged over `segments` equal parts of training."""
  if segments < 1:
    raise ValueError(f"segments={segments}: expected >= 1")
  rows = []
  for d in dirs:
    seed, finished = finished_runs(d)
    by_size: dict[str, dict[str, pathlib.Path]] = defaultdict(dict)
    for size, run, run_dir in finished:
      by_size[size][run] = run_dir
    for _, runs in sorted(by_size.items()):
      for run, ref in _trajectory_pairs(runs):
        a, b = train_losses(runs[run]), train_losses(runs[ref])
        if len(a) != len(b) or len(a) < segments:
          raise ValueError(f"{runs[run]} and {runs[ref]} logged {len(a)} and {len(b)} training "
                           f"losses: expected the same number, at least segments={segments}")
        parts = np.array_split(a - b, segments)
        final = [json.loads((runs[r] / "result.json").read_text()) for r in (run, ref)]
        val = ("-" if None in (final[0]["val_loss"], final[1]["val_loss"])
               else f"{final[0]['val_loss'] - final[1]['val_loss']:+.4f}")
        rows.append([f"{final[0]['params'] / 1e6:.2f}M", f"{run} - {ref}", str(seed),
                     " ".join(f"{p.mean():+.3f}" for p in parts), val])
  if not rows:
    raise ValueError(f"no paired runs (quest8 with bf16, or questB with steB) under {dirs}")
  return markdown_table(["size", "pair", "seed",
                         f"training-loss gap over {segments} segments (nats)",
                         "final val gap"], rows)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("dirs", nargs="+")
  parser.add_argument("--out", default="")
  parser.add_argument("--full-val", action="store_true",
                      help="re-evaluate every run on all validation windows (paired per window)")
  parser.add_argument("--trajectory", action="store_true",
                      help="also print the paired training-loss gaps over segments of training")
  parser.add_argument("--segments", type=int, default=8)
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  windows: dict | None = {} if args.full_val else None
  text = seed_table(load_runs(args.dirs, windows=windows), windows)
  if args.trajectory:
    text += "\n\n" + trajectory_table(args.dirs, args.segments)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  return text


if __name__ == "__main__":
  main()
