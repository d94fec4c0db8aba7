"""Train a value, Q or policy model of the arithmetic policy from a reasoning-data JSONL file.

  python -m experiments.train_value method=step_dpo data=pairs.jsonl out=runs/q_model
  python -m experiments.train_value method=oreo data=samples.jsonl out=runs/oreo run.num_steps=400

One method per run, each a resumable run of ``qstar_jax.training.value_runs`` on the one train
loop, starting from the policy (``policy=DIR``, an arithmetic-policy folder; default the
committed one), with the policy as the frozen reference:

- ``step_dpo``: step-level DPO (Zhai et al.) on step preference pairs (`PreferencePair` JSONL,
  e.g. from MCTS annotation): the result is a Q-model, ``Q = beta * mean_tokens(log pi_q -
  log pi_ref)`` (`qstar_jax.search.steps.LogRatioQ`);
- ``dpo``: DPO on response-level pairs (the context is the prompt, the steps whole solutions);
- ``sft``: next-token loss on trajectories (`Trajectory` JSONL); ``rejection_sampling``: the
  same on the trajectories with reward > 0 only;
- ``oreo``: OREO's policy and value (value head on the shared trunk, initialised from the
  policy's head);
- ``prm``: implicit PRM (PRIME) on the trajectories' outcome labels.

Writes ``out/run/`` (orbax checkpoints, ``metrics.jsonl``, TensorBoard), ``out/model/`` (an
arithmetic-policy folder: the trained Llama, the value head (OREO's, else the policy's), the
tokenizer: ``load_arithmetic_policy(out/model)`` reads it) and ``out/results.json``.
Resuming: kill the run (even SIGKILL) and rerun the same command: it continues from its last
checkpoint and ends with the parameters of an uninterrupted run. A NaN loss stops the run with
an error naming its step; the last good checkpoint is kept. Presets:
experiments/presets/train_value/*.yaml.

Devices: ``mesh=`` ("" = all devices on data; e.g. ``mesh=fsdp=8``) shards the model and the
frozen reference by `qstar_jax.distributed`'s rules and splits each batch over data x fsdp
(``run.batch_size`` must divide over them); ``runtime.*`` sets the compilation cache and the
multi-host start. A run resumes on another mesh; only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shlex
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from qstar_jax.data.reasoning import PreferencePair, Trajectory, read_reasoning_jsonl
from qstar_jax.distributed import RuntimeConfig, is_main_process
from qstar_jax.models.arithmetic_policy import load_arithmetic_policy, save_trained_policy
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.results import write_json
from qstar_jax.training.run_setup import setup_run
from qstar_jax.training.value_learning import oreo_params
from qstar_jax.training.value_runs import (
  ValueRunConfig,
  run_oreo,
  run_preference,
  run_prm,
  run_sft,
)

PRESETS_DIR = pathlib.Path(__file__).resolve().parent / "presets" / "train_value"
METHODS = ("step_dpo", "dpo", "sft", "rejection_sampling", "oreo", "prm")
PAIR_METHODS = ("step_dpo", "dpo")
DEFAULT_BETA = {"step_dpo": 0.1, "dpo": 0.1, "oreo": 0.03, "prm": 0.05}


@dataclasses.dataclass(frozen=True)
class TrainValueConfig:
  out: str = "runs/train_value"
  method: str = "step_dpo"        # one of METHODS
  data: str = ""                  # JSONL: PreferencePair (step_dpo, dpo) or Trajectory records
  policy: str = ""                # arithmetic-policy folder; "" = the committed policy
  beta: float = 0.0               # 0: the method's default (DEFAULT_BETA)
  alpha: float = 0.0              # OREO's KL weight; 0: OREO's default (0.01 token, 0.1 step)
  kl: str = "k3"                  # OREO's KL: "k3" or "exact"
  step_level: bool = False        # OREO at the step level
  label_smoothing: float = 0.0    # DPO
  run: ValueRunConfig = dataclasses.field(default_factory=ValueRunConfig)
  # Where it runs (may change on resume): "" = all devices on data, else e.g. "fsdp=8".
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)


def _check(cfg: TrainValueConfig) -> None:
  if cfg.method not in METHODS:
    raise ValueError(f"method={cfg.method!r}: expected one of {METHODS}")
  if not cfg.data:
    raise ValueError("data= is empty: expected a reasoning JSONL file (PreferencePair records "
                     f"for {PAIR_METHODS}, Trajectory records otherwise)")
  if not pathlib.Path(cfg.data).is_file():
    raise FileNotFoundError(f"data={cfg.data}: no such file")
  if cfg.beta < 0 or cfg.alpha < 0:
    raise ValueError(f"beta={cfg.beta}, alpha={cfg.alpha}: expected >= 0 (0 = the default)")


def params_digest(params: Any) -> str:
  """sha256 (16 hex digits) of the parameters' bytes, in tree order: equal digests, equal floats."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def train_value(cfg: TrainValueConfig, *, command: str = "",
                mesh: Mesh | None = None) -> dict[str, Any]:
  """Runs the method of ``cfg`` (see the module doc) on ``mesh`` (None: one device); returns the
  results dict it writes."""
  _check(cfg)
  out = pathlib.Path(cfg.out)
  policy = load_arithmetic_policy(cfg.policy or None)
  record_type = PreferencePair if cfg.method in PAIR_METHODS else Trajectory
  records = read_reasoning_jsonl(cfg.data, record_type)
  if cfg.method == "rejection_sampling":
    kept = [t for t in records if t.reward > 0]
    if not kept:
      raise ValueError(f"rejection_sampling: none of the {len(records)} trajectories of "
                       f"{cfg.data} has reward > 0: expected at least one correct sample")
    records = kept
  beta = cfg.beta or DEFAULT_BETA.get(cfg.method, 0.0)
  common = dict(pad_id=policy.pad_id, cfg=cfg.run, out_dir=out / "run", mesh=mesh)
  value = {k: np.asarray(v) for k, v in policy.value_head().items()}
  t0 = time.perf_counter()
  if cfg.method in PAIR_METHODS:
    result = run_preference(policy.graphdef, policy.params, records,
                            reference_params=policy.params, beta=beta,
                            mean_tokens=cfg.method == "step_dpo",
                            label_smoothing=cfg.label_smoothing, **common)
    trained = result.params
  elif cfg.method in ("sft", "rejection_sampling"):
    result = run_sft(policy.graphdef, policy.params, records, **common)
    trained = result.params
  elif cfg.method == "oreo":
    result = run_oreo(policy.graphdef, oreo_params(policy.params, value), records,
                      reference_params=policy.params, beta=beta, alpha=cfg.alpha or None,
                      kl=cfg.kl, step_level=cfg.step_level, **common)
    trained = result.params["policy"]
    value = {k: np.asarray(v) for k, v in result.params["value"].items()}
  else:
    result = run_prm(policy.graphdef, policy.params, records, reference_params=policy.params,
                     beta=beta, **common)
    trained = result.params
  seconds = time.perf_counter() - t0
  if is_main_process():
    save_trained_policy(
      out / "model", policy, trained, value,
      training={"method": cfg.method, "data": str(cfg.data), "beta": beta, "command": command},
      readme=f"# {cfg.method} model of the arithmetic policy\n\nMade by:\n\n    {command}\n")
  results = {
    "config": config_to_dict(cfg), "method": cfg.method, "beta": beta,
    "num_examples": len(records), "steps": cfg.run.num_steps,
    "resumed_from_step": result.resumed_from, "final_train_loss": result.last_train_loss,
    "params_digest": params_digest(trained), "seconds": round(seconds, 2),
    "model": str(out / "model"), "command": command,
  }
  write_json(out / "results.json", results)
  print(json.dumps({k: results[k] for k in ("method", "num_examples", "resumed_from_step",
                                            "final_train_loss", "params_digest")}))
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  cfg = parse_config(TrainValueConfig, argv, presets_dir=PRESETS_DIR)
  command = shlex.join(["python", "-m", "experiments.train_value", *argv])
  _check(cfg)  # the config's own errors first, before the runtime touches the devices
  mesh = setup_run(cfg.mesh, cfg.runtime, batch_sizes={"run.batch_size": cfg.run.batch_size})
  return train_value(cfg, command=command, mesh=mesh)


if __name__ == "__main__":
  main()
