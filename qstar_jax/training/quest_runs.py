"""The QuEST scaling runs of `experiments.quest_scaling`: their config, data (a SentencePiece
tokenizer trained on the corpus, packed windows), model and optimizer, and the re-evaluation of a
finished run's checkpoint on every validation window (`window_losses`, used by
`experiments.quest_seeds`)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.data.pipeline import pack_tokens, read_gsm8k_split, read_tiny_shakespeare_splits
from qstar_jax.distributed import RuntimeConfig
from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.llama import Llama
from qstar_jax.models.tokenizer import SentencePieceTokenizer, train_sentencepiece
from qstar_jax.quant import QuantConfig
from qstar_jax.training.checkpoint import CheckpointManager, abstract_like
from qstar_jax.training.config import config_from_dict
from qstar_jax.training.lm import window_mean_nll
from qstar_jax.training.optim import OptimizerConfig, make_optimizer
from qstar_jax.training.run_setup import made_once

__all__ = [
  "RUN_KINDS",
  "QuestScalingConfig",
  "TrainSettings",
  "corpus_texts",
  "optimizer_config",
  "prepare_data",
  "quest_model_config",
  "window_losses",
]

# name -> (method, w_bits, a_bits)
RUN_KINDS: dict[str, tuple[str, int | None, int | None]] = {
  "bf16": ("bf16", None, None),
  "quest8": ("quest", 8, 8),
  "quest4": ("quest", 4, 4),
  "quest3": ("quest", 3, 3),
  "quest2": ("quest", 2, 2),
  "quest1": ("quest", 1, 1),
  "ste4": ("ste", 4, 4),
  "ste2": ("ste", 2, 2),
  "ste1": ("ste", 1, 1),
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  steps: int = 300              # optimizer steps per run
  batch_size: int = 16          # sequences per step
  seq_len: int = 128
  lr: float = 3e-3
  warmup_frac: float = 0.1
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class QuestScalingConfig:
  """One table of `experiments.quest_scaling`: model sizes x precisions on one corpus."""

  out: str = "runs/quest_scaling"
  # Model sizes: [hidden, intermediate, layers, heads] (head_dim = hidden / heads).
  sizes: tuple[tuple[int, int, int, int], ...] = ((128, 384, 2, 2), (128, 512, 4, 2),
                                                 (256, 768, 4, 4))
  # Steps per size (same length as sizes; empty: train.steps for all).
  steps_per_size: tuple[int, ...] = ()
  runs: tuple[str, ...] = tuple(RUN_KINDS)
  vocab_size: int = 1024
  dtype: str = "float32"        # compute dtype of the model ("bfloat16" on accelerators)
  hadamard_block: int = 128
  val_sequences: int = 128      # validation windows of seq_len tokens (fixed, evenly spaced)
  eval_batch_size: int = 32
  data_backend: str = "files"   # "files" | "tfds" | "auto"
  collect_only: bool = False    # only gather finished runs' results (train nothing)
  train: TrainSettings = TrainSettings()
  # Where it runs (may change on resume): "" = all devices on data, else e.g. "fsdp=8".
  mesh: str = ""
  runtime: RuntimeConfig = RuntimeConfig()


def corpus_texts(backend: str = "files") -> tuple[str, str]:
  """(train text, validation text): tiny Shakespeare 90/10 split + GSM8K train / test."""
  sh_train, sh_val = read_tiny_shakespeare_splits(backend=backend)

  def gsm_text(split):
    rows = read_gsm8k_split(split, backend=backend)
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)

  return sh_train + "\n\n" + gsm_text("train"), sh_val + "\n\n" + gsm_text("test")


def prepare_data(cfg: QuestScalingConfig, out: pathlib.Path
                 ) -> tuple[SentencePieceTokenizer, np.ndarray, np.ndarray]:
  """(tokenizer, train windows, val windows) of a table's out dir.

  Trains the SentencePiece tokenizer on the training text once (out/tokenizer/spm{V}.model) and
  caches both splits' token ids (out/tokenizer/tokens{V}.npz); the validation windows are
  `cfg.val_sequences` evenly spaced ones of all of them. On several processes process 0 makes
  both files and the others load them.
  """
  train_text, val_text = corpus_texts(cfg.data_backend)
  prefix = out / "tokenizer" / f"spm{cfg.vocab_size}"
  model_file = prefix.with_suffix(".model")
  tok = made_once(
    model_file, lambda: train_sentencepiece(train_text, vocab_size=cfg.vocab_size,
                                            model_prefix=prefix),
    lambda: SentencePieceTokenizer(model_file))
  cache = out / "tokenizer" / f"tokens{cfg.vocab_size}.npz"

  def encode():
    ids = {"train": np.asarray(tok.encode(train_text), np.int32),
           "val": np.asarray(tok.encode(val_text), np.int32)}
    np.savez(cache, **ids)
    return ids

  def load():
    data = np.load(cache)
    return {"train": data["train"], "val": data["val"]}

  ids = made_once(cache, encode, load)
  train_ids, val_ids = ids["train"], ids["val"]
  t = cfg.train.seq_len
  train_windows = pack_tokens(train_ids, t)
  val_all = pack_tokens(val_ids, t)
  pick = np.linspace(0, len(val_all) - 1, min(cfg.val_sequences, len(val_all))).astype(int)
  return tok, train_windows, val_all[pick]


def quest_model_config(cfg: QuestScalingConfig, size: tuple[int, int, int, int],
                       run: str) -> LlamaConfig:
  """The Llama config of one (size, precision) run: tied embeddings, QuEST / STE projections
  at the run's bits (none for "bf16")."""
  if run not in RUN_KINDS:
    raise ValueError(f"run {run!r}: expected one of {list(RUN_KINDS)}")
  hidden, inter, layers, heads = size
  method, w_bits, a_bits = RUN_KINDS[run]
  quant = None
  if method != "bf16":
    quant = QuantConfig(w_bits=w_bits, a_bits=a_bits, method=method,
                        hadamard_block=cfg.hadamard_block)
  return LlamaConfig(
    vocab_size=cfg.vocab_size, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
    num_heads=heads, num_kv_heads=heads, max_position_embeddings=max(256, cfg.train.seq_len),
    tie_word_embeddings=True, dtype=cfg.dtype, quant=quant,
  )


def optimizer_config(ts: TrainSettings, steps: int) -> OptimizerConfig:
  """AdamW settings of one run of `steps` steps (warmup a fraction of them)."""
  return OptimizerConfig(lr=ts.lr, warmup_steps=max(1, int(ts.warmup_frac * steps)),
                         weight_decay=ts.weight_decay, grad_clip_norm=ts.grad_clip_norm)


def window_losses(run_dir: str | pathlib.Path, *, batch_size: int = 32) -> np.ndarray:
  """Next-token loss of a finished QuEST scaling run's final checkpoint on every validation
  window.

  `run_dir` is `out/runs/<size>_<run>` of `experiments.quest_scaling`. The table's `val_loss`
  averages `val_sequences` evenly spaced windows; this evaluates all of them (the whole
  validation text), one mean loss per window, float64 [num windows]. Pairing two runs window
  by window (`experiments.quest_seeds --full-val`) separates the evaluation's sampling error
  from the training seed's spread.
  """
  run_dir = pathlib.Path(run_dir)
  config_file = run_dir / "checkpoints" / "config.json"
  if not (run_dir / "result.json").is_file() or not config_file.is_file():
    raise FileNotFoundError(f"{run_dir} holds no finished quest_scaling run (result.json and "
                            "checkpoints/config.json expected)")
  run_config = json.loads(config_file.read_text())
  cfg = config_from_dict(QuestScalingConfig, run_config["experiment"])
  size, run, steps = tuple(run_config["size"]), run_config["run"], int(run_config["steps"])
  out = run_dir.parent.parent
  cache = out / "tokenizer" / f"tokens{cfg.vocab_size}.npz"
  if not cache.is_file():
    prepare_data(cfg, out)  # retrains the (deterministic) tokenizer and writes the cache
  windows = pack_tokens(np.load(cache)["val"], cfg.train.seq_len)

  ts = cfg.train
  graphdef, params = nnx.split(Llama(quest_model_config(cfg, size, run),
                                     rngs=nnx.Rngs(ts.seed)))
  optimizer = make_optimizer(optimizer_config(ts, steps), total_steps=steps)
  target = {"params": params, "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32)}
  manager = CheckpointManager(run_dir / "checkpoints", config=run_config)
  try:
    last = manager.latest_step()
    if last != steps:
      raise ValueError(f"{run_dir}: latest checkpoint is step {last}, expected the final {steps}")
    params = manager.restore(last, target=abstract_like(target))["params"]
  finally:
    manager.close()
  return window_mean_nll(graphdef, params, windows, batch_size=batch_size)
