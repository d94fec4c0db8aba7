"""Train a puzzle heuristic (DAVI value net for A*, or DQN Q-net for Q*).

  python -m experiments.train_puzzle preset=cube3_q1884_cpu out=runs/cube3_q1884
  python -m experiments.train_puzzle domain=puzzle15 head=q steps=2000 out=runs/p15_q

Writes ``out/metrics.jsonl`` (loss log), ``out/checkpoints`` (orbax, resumed on rerun),
``out/model`` (the final network, loadable with ``qstar_jax.training.load_puzzle_net``) and
``out/train_summary.json``. Presets: experiments/presets/train_puzzle/*.yaml.

``mesh=`` chooses the device mesh ("" = all devices on data; e.g. ``mesh=fsdp=8``), ``runtime.*``
the compilation cache and multi-host start (`qstar_jax.distributed.RuntimeConfig`); a run resumes
on another mesh.
"""

from __future__ import annotations

import pathlib
import sys

from qstar_jax.training.config import parse_config
from qstar_jax.training.puzzle import PuzzleTrainConfig, train_puzzle
from qstar_jax.training.run_setup import setup_run

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "train_puzzle"


def main(argv: list[str] | None = None) -> dict:
  cfg = parse_config(PuzzleTrainConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  mesh = setup_run(cfg.mesh, cfg.runtime, batch_sizes={"batch_size": cfg.batch_size})
  return train_puzzle(cfg, mesh=mesh)


if __name__ == "__main__":
  main()
