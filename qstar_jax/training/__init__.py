"""qstar_jax.training: configs, metrics, progress, checkpoints, results, optimizers, the train
loop, and puzzle-heuristic training (DAVI / deep Q-learning) on that loop."""

from qstar_jax.training.annotation import Annotation, AnnotationConfig, annotate_with_mcts
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
from qstar_jax.training.puzzle import PuzzleTrainConfig, load_puzzle_net, train_puzzle
from qstar_jax.training.reasoning_data import (
  problem_metadata,
  sample_trajectories,
  trajectories_from_generations,
)
from qstar_jax.training.results import (
  markdown_table,
  read_json,
  save_plot,
  write_json,
  write_results,
)
from qstar_jax.training.train_loop import (
  NonFiniteLossError,
  TrainLoopConfig,
  TrainResult,
  TrainState,
  make_train_chunk,
  make_train_step,
  train,
)
from qstar_jax.training.value_learning import (
  check_reference_vocabulary,
  dpo_loss_fn,
  implicit_prm_loss_fn,
  logits_vocab_size,
  oreo_loss_fn,
  oreo_params,
  reference_log_probs,
  with_reference_log_probs,
)
from qstar_jax.training.value_runs import (
  ValueRunConfig,
  data_fingerprint,
  default_run_config,
  response_pairs,
  run_oreo,
  run_preference,
  run_prm,
  run_sft,
)

__all__ = [
  "CheckpointConfigMismatchError",
  "CheckpointManager",
  "ConfigError",
  "MetricsWriter",
  "OptimizerConfig",
  "PhaseTimer",
  "PuzzleTrainConfig",
  "NonFiniteLossError",
  "TrainLoopConfig",
  "TrainResult",
  "TrainState",
  "abstract_like",
  "check_reference_vocabulary",
  "config_from_dict",
  "config_to_dict",
  "dpo_loss_fn",
  "implicit_prm_loss_fn",
  "load_model",
  "load_puzzle_net",
  "logits_vocab_size",
  "lr_schedule",
  "make_optimizer",
  "make_train_chunk",
  "make_train_step",
  "markdown_table",
  "oreo_loss_fn",
  "oreo_params",
  "parse_config",
  "problem_metadata",
  "progress",
  "read_metrics",
  "reference_log_probs",
  "sample_trajectories",
  "save_model",
  "save_plot",
  "train",
  "train_puzzle",
  "trajectories_from_generations",
  "with_reference_log_probs",
  "write_results",
  "read_json",
  "write_json",
  # value learning runs and MCTS annotation
  "Annotation",
  "AnnotationConfig",
  "annotate_with_mcts",
  "ValueRunConfig",
  "data_fingerprint",
  "default_run_config",
  "response_pairs",
  "run_oreo",
  "run_preference",
  "run_prm",
  "run_sft",
]
