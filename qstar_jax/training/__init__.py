"""qstar_jax.training: configs, metrics, progress, checkpoints, results, optimizers, train loop."""

from qstar_jax.training.checkpoint import (
  CheckpointConfigMismatchError,
  CheckpointManager,
  abstract_like,
  load_model,
  save_model,
)
from qstar_jax.training.config import (
  ConfigError,
  config_from_dict,
  config_to_dict,
  parse_config,
)
from qstar_jax.training.metrics import MetricsWriter, read_metrics
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.progress import PhaseTimer, progress
from qstar_jax.training.results import markdown_table, save_plot, write_results
from qstar_jax.training.train_loop import TrainLoopConfig, TrainResult, make_train_step, train

__all__ = [
  "CheckpointConfigMismatchError",
  "CheckpointManager",
  "ConfigError",
  "MetricsWriter",
  "OptimizerConfig",
  "TrainLoopConfig",
  "TrainResult",
  "PhaseTimer",
  "abstract_like",
  "config_from_dict",
  "config_to_dict",
  "load_model",
  "lr_schedule",
  "make_optimizer",
  "make_train_step",
  "markdown_table",
  "parse_config",
  "progress",
  "read_metrics",
  "save_model",
  "save_plot",
  "train",
  "write_results",
]

# Puzzle heuristics: DAVI / deep Q-learning (Q* search helper).
from qstar_jax.training.puzzle import PuzzleTrainConfig, load_puzzle_net, train_puzzle  # noqa: E402

__all__ += ["PuzzleTrainConfig", "load_puzzle_net", "train_puzzle"]
