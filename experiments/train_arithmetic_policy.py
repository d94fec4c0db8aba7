"""Train the small arithmetic policy and its outcome value head (the committed
``qstar_jax/assets/arithmetic_policy``).

  python -m experiments.train_arithmetic_policy preset=cpu out=runs/arithmetic_policy install=true

The pipeline is ``qstar_jax.training.arithmetic_policy.train_arithmetic_policy``: SFT corpus
(train-split problems, a share with one injected wrong step), SentencePiece tokenizer, SFT on
the project's train loop (orbax checkpoints in ``out/checkpoints``, resumed on rerun;
``out/metrics.jsonl``), greedy accuracy on the test split, majority@K, then the value head fitted
on the policy's own samples. Writes the artifacts (``tokenizer.model``, ``params.npz``,
``config.json``, ``README.md``) into ``out``; ``install=true`` (or ``--install``) also copies them
into the package's assets folder. Presets: experiments/presets/train_arithmetic_policy/*.yaml.
``mesh=`` chooses the SFT's device mesh ("" = all devices on data; e.g. ``mesh=fsdp=8``),
``runtime.*`` the compilation cache and the multi-host start; a run resumes on another mesh.
"""

from __future__ import annotations

import pathlib
import shlex
import sys
from typing import Any

from qstar_jax.training.arithmetic_policy import ArithmeticPolicyConfig, train_arithmetic_policy
from qstar_jax.training.config import parse_config
from qstar_jax.training.run_setup import setup_run

PRESETS_DIR = pathlib.Path(__file__).resolve().parent / "presets" / "train_arithmetic_policy"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv = ["install=true" if a == "--install" else a for a in argv]
  cfg = parse_config(ArithmeticPolicyConfig, argv, presets_dir=PRESETS_DIR)
  command = shlex.join(["python", "-m", "experiments.train_arithmetic_policy", *argv])
  mesh = setup_run(cfg.mesh, cfg.runtime, batch_sizes={"data.batch_size": cfg.data.batch_size})
  return train_arithmetic_policy(cfg, command=command, mesh=mesh)


if __name__ == "__main__":
  main()
