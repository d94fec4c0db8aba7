"""Pretrain a small Llama-style LM on tiny Shakespeare with a project-trained SentencePiece model.

  python -m experiments.lm_pretrain preset=cpu out=runs/lm_cpu [key=value ...]

Steps: read tiny Shakespeare (tfds builder -> array_record when tensorflow-datasets is installed,
else the plain file; 90/10 train/validation split by characters), train a byte-fallback BPE
SentencePiece model on the training split, pack each split's tokens into [N, T + 1] windows,
train ``qstar_jax.models.Llama`` with the generic train loop (AdamW, warmup + cosine, orbax
auto-resume of ``out``), and report the validation loss next to the unigram baseline.

Baseline (the "unigram entropy of the tokenized corpus"): the cross-entropy of the validation
targets under the training split's token frequencies, add-one smoothed,
``H_uni = -(1/N) sum_{val targets y} log((c_train(y) + 1) / (N_train + V))`` in nats/token,
over exactly the target tokens the model's validation loss averages over. A model that ignores
context cannot do better than (about) this; the training split's own unigram entropy
``-sum_v p(v) log p(v)`` is reported too.

Writes ``out/results.json``, ``out/table.md``, ``out/loss_curve.png``, ``out/metrics.jsonl``,
``out/checkpoints/``, ``out/tokenizer.model``. Rerunning the same command after the process was
killed resumes from the last checkpoint and ends with the same numbers.

Devices: ``mesh=`` ("" = all devices on data; ``mesh=fsdp=8``, ``mesh=data=2,tensor=4``, ...)
shards the model by `qstar_jax.distributed`'s rules and splits each batch over ``data`` x
``fsdp`` (``data.batch_size`` and ``data.eval_batch_size`` must divide over them); ``runtime.*``
sets the compilation cache and the multi-host start. The same command runs on every host of a
pod slice: each host reads only its rows of every batch, process 0 writes the results. A run
resumes on another mesh.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.data.pipeline import (
  iterate_batches,
  pack_tokens,
  process_rows,
  read_tiny_shakespeare_splits,
)
from qstar_jax.distributed import RuntimeConfig, data_shard, is_main_process, mesh_summary
from qstar_jax.models import Llama, LlamaConfig
from qstar_jax.models.params import count_params
from qstar_jax.models.tokenizer import SentencePieceTokenizer, train_sentencepiece
from qstar_jax.training.config import config_to_dict, parse_config
from qstar_jax.training.lm import lm_loss_fn
from qstar_jax.training.metrics import read_metrics
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.progress import PhaseTimer
from qstar_jax.training.results import markdown_table, new_figure, save_plot, write_results
from qstar_jax.training.run_setup import (
  check_batch_sizes,
  made_once,
  mesh_ignore_keys,
  setup_run,
)
from qstar_jax.training.train_loop import TrainLoopConfig, train

PRESETS_DIR = pathlib.Path(__file__).resolve().parent / "presets" / "lm_pretrain"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 1024          # SentencePiece pieces (= model vocabulary)
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  tie_word_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"          # compute dtype ("bfloat16" on accelerators)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  backend: str = "auto"           # "tfds" (array_record via the project's builder), "files", "auto"
  val_fraction: float = 0.1
  seq_len: int = 128              # T: tokens per example (windows hold T + 1)
  batch_size: int = 32            # sequences per optimizer step
  eval_batch_size: int = 32
  max_eval_batches: int | None = None   # None: every full batch of the validation windows
  max_train_chars: int | None = None    # use only a prefix of the training text (tests)
  max_val_chars: int | None = None
  tokenizer_train_chars: int | None = None  # SentencePiece trains on this prefix (None: all)


@dataclasses.dataclass(frozen=True)
class LMPretrainConfig:
  out: str = "runs/lm_pretrain"
  seed: int = 0
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimizerConfig = dataclasses.field(
    default_factory=lambda: OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1)
  )
  loop: TrainLoopConfig = dataclasses.field(
    default_factory=lambda: TrainLoopConfig(num_steps=400, eval_every=100, checkpoint_every=100)
  )
  plot: bool = True
  # Rematerialise each block in the backward pass: same values, activation memory of ~one block
  # (for ~1/3 more compute); may change on resume.
  remat: bool = False
  # Where it runs (may change on resume): "" = all devices on data, else e.g. "fsdp=8".
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)


# ----------------------------------------------------------------------------------- pieces


def load_splits(cfg: DataConfig) -> tuple[str, str]:
  train, val = read_tiny_shakespeare_splits(backend=cfg.backend, val_fraction=cfg.val_fraction)
  if cfg.max_train_chars is not None:
    train = train[: cfg.max_train_chars]
  if cfg.max_val_chars is not None:
    val = val[: cfg.max_val_chars]
  return train, val


def get_tokenizer(out: pathlib.Path, train_text: str, cfg: LMPretrainConfig):
  """Trains the SentencePiece model once per run folder (reused when resuming; on several
  processes process 0 trains it, the others load it)."""
  path = out / "tokenizer.model"

  def make():
    corpus = train_text[: cfg.data.tokenizer_train_chars] if cfg.data.tokenizer_train_chars else train_text
    return train_sentencepiece(corpus, vocab_size=cfg.model.vocab_size,
                               model_prefix=out / "tokenizer")

  tok = made_once(path, make, lambda: SentencePieceTokenizer(path))
  if tok.vocab_size != cfg.model.vocab_size:
    raise ValueError(
      f"tokenizer {path} has {tok.vocab_size} pieces, config model.vocab_size={cfg.model.vocab_size}"
    )
  return tok


def unigram_baselines(train_ids: np.ndarray, val_targets: np.ndarray, vocab_size: int) -> dict[str, float]:
  """Unigram entropy of the training split and cross-entropy of ``val_targets`` (nats/token).

  ``p(v) = (c_train(v) + 1) / (N_train + V)`` for the cross-entropy (add-one: a piece absent
  from the training split would otherwise cost infinity); the plain entropy uses unsmoothed
  frequencies.
  """
  counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64)
  n = counts.sum()
  p = counts / n
  nz = p > 0
  entropy = float(-(p[nz] * np.log(p[nz])).sum())
  smooth = (counts + 1.0) / (n + vocab_size)
  cross = float(-np.log(smooth[val_targets]).mean())
  return {"unigram_entropy_train": entropy, "unigram_cross_entropy_val": cross}


def make_model(cfg: LMPretrainConfig, max_len: int):
  m = cfg.model
  llama_cfg = LlamaConfig(
    vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
    num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
    max_position_embeddings=max_len, tie_word_embeddings=m.tie_word_embeddings,
    param_dtype=m.param_dtype, dtype=m.dtype, bos_token_id=1, eos_token_ids=(2,),
  )
  return Llama(llama_cfg, rngs=nnx.Rngs(cfg.seed))


def plot_curves(out: pathlib.Path, unigram: float) -> pathlib.Path | None:
  recs = read_metrics(out)
  train = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
  val = [(r["step"], r["eval/loss"]) for r in recs if "eval/loss" in r]
  fig, ax = new_figure(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
  if val:
    ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
  ax.axhline(unigram, color="gray", ls="--", label="unigram cross-entropy (val)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.set_title("lm_pretrain: tiny Shakespeare")
  ax.legend()
  return save_plot(fig, out / "loss_curve.png")


# ------------------------------------------------------------------------------------- run


def batch_sizes(cfg: LMPretrainConfig) -> dict[str, int]:
  """The global batch sizes the mesh must divide, by config key."""
  return {"data.batch_size": cfg.data.batch_size, "data.eval_batch_size": cfg.data.eval_batch_size}


def run(cfg: LMPretrainConfig, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """The whole experiment into ``cfg.out``; ``mesh``: the train loop's device mesh (None: one
  device; ``main`` passes the mesh of ``cfg.mesh``)."""
  if mesh is not None:  # before any data: the error names the config key
    check_batch_sizes(mesh, batch_sizes(cfg))
  t_start = time.perf_counter()
  timer = PhaseTimer()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  with timer.phase("data"):
    train_text, val_text = load_splits(cfg.data)
    tok = get_tokenizer(out, train_text, cfg)
    train_ids = np.asarray(tok.encode(train_text), np.int32)
    val_ids = np.asarray(tok.encode(val_text), np.int32)
    train_windows = pack_tokens(train_ids, cfg.data.seq_len)
    val_windows = pack_tokens(val_ids, cfg.data.seq_len)
  n_eval = len(val_windows) // cfg.data.eval_batch_size
  if cfg.data.max_eval_batches is not None:
    n_eval = min(n_eval, cfg.data.max_eval_batches)
  if n_eval < 1:
    raise ValueError(
      f"validation split has {len(val_windows)} windows of {cfg.data.seq_len + 1} tokens, fewer "
      f"than data.eval_batch_size={cfg.data.eval_batch_size}"
    )
  eval_windows = val_windows[: n_eval * cfg.data.eval_batch_size]
  baselines = unigram_baselines(train_ids, eval_windows[:, 1:].reshape(-1), cfg.model.vocab_size)

  model = make_model(cfg, cfg.data.seq_len + 1)
  graphdef, params = nnx.split(model)
  n_params = count_params(params)
  num_steps = cfg.loop.num_steps
  optimizer = make_optimizer(cfg.optim, total_steps=num_steps)
  loss = lm_loss_fn(graphdef, remat=cfg.remat)
  bsz = cfg.data.batch_size
  shard = data_shard()  # several processes: each reads its rows of every global batch

  def train_batches(start: int):
    return iterate_batches(train_windows, batch_size=bsz, seed=cfg.seed, start_step=start,
                           shard=shard)

  def eval_batches():
    return (process_rows(eval_windows[i * cfg.data.eval_batch_size:
                                      (i + 1) * cfg.data.eval_batch_size], shard)
            for i in range(n_eval))

  print(
    f"lm_pretrain: {n_params:,} params, vocab {tok.vocab_size}, {len(train_ids):,} train / "
    f"{len(val_ids):,} val tokens ({len(train_text) / len(train_ids):.2f} chars/token), "
    f"{len(train_windows)} train windows, {num_steps} steps x {bsz} x {cfg.data.seq_len}",
    flush=True,
  )
  result = train(
    loss, params, optimizer=optimizer, train_batches=train_batches, config=cfg.loop,
    out_dir=out, run_config=config_to_dict(cfg), eval_batches=eval_batches,
    lr_fn=lr_schedule(cfg.optim, total_steps=num_steps),
    on_eval=lambda s, m: print(f"step {s}: val loss {m['loss']:.4f}", flush=True),
    ignore_config_keys=(*mesh_ignore_keys(), "remat"), mesh=mesh,
  )
  val_loss = result.eval_history[-1][1]["loss"]
  n_val_targets = eval_windows[:, 1:].size
  # Characters covered by the evaluated targets ~ tokens x (chars/token of the validation split).
  val_chars_per_token = len(val_text) / len(val_ids)
  bits_per_char = val_loss / math.log(2) / val_chars_per_token
  wall = time.perf_counter() - t_start
  results = {
    "val_loss": val_loss,
    "final_train_loss": result.last_train_loss,
    **baselines,
    "val_loss_minus_unigram": val_loss - baselines["unigram_cross_entropy_val"],
    "val_bits_per_char": bits_per_char,
    "eval_history": [{"step": s, **m} for s, m in result.eval_history],
    "num_params": n_params,
    "vocab_size": tok.vocab_size,
    "train_tokens": int(len(train_ids)),
    "val_tokens": int(len(val_ids)),
    "val_target_tokens_evaluated": int(n_val_targets),
    "chars_per_token_val": val_chars_per_token,
    "steps": num_steps,
    "tokens_per_step": bsz * cfg.data.seq_len,
    "steps_per_s": result.steps_per_s,
    "tokens_per_s": result.steps_per_s * bsz * cfg.data.seq_len,
    "resumed_from_step": result.resumed_from,
    "wall_time_s": wall,
    "timings_s": {**timer.summary(), **result.timings},
    "device": str(jax.devices()[0].platform),
    "mesh": None if mesh is None else mesh_summary(mesh),
    "config": config_to_dict(cfg),
  }
  resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
  table = markdown_table(
    ["quantity", "value (nats/token)"],
    [
      ["validation loss (model, mean next-token cross-entropy)", val_loss],
      ["unigram cross-entropy of the same validation targets, train-split token frequencies "
       "(add-one smoothed)", baselines["unigram_cross_entropy_val"]],
      ["unigram entropy of the train split (its own token frequencies)",
       baselines["unigram_entropy_train"]],
      ["final train loss (last step's batch)", result.last_train_loss],
    ],
  )
  table += (
    f"\n{n_params:,} parameters, SentencePiece BPE vocabulary {tok.vocab_size}, "
    f"{num_steps} steps of {bsz} x {cfg.data.seq_len} tokens, validation = last "
    f"{cfg.data.val_fraction:.0%} of the characters ({n_val_targets:,} target tokens); "
    f"validation bits/char {bits_per_char:.3f}; wall time {wall:.1f} s on "
    f"{results['device']}{resumed}.\n"
  )
  write_results(out, results=results, table_md=table)
  if cfg.plot and is_main_process():
    plot_curves(out, baselines["unigram_cross_entropy_val"])
  print(table, flush=True)
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cfg = parse_config(LMPretrainConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS_DIR)
  mesh = setup_run(cfg.mesh, cfg.runtime, batch_sizes=batch_sizes(cfg))
  return run(cfg, mesh=mesh)


if __name__ == "__main__":
  main()
