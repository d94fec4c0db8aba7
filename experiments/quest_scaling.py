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
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

PRESETS = pathlib.Path(__file__).resolve().parent / "presets" / "quest_scaling"

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


# ------------------------------------------------------------------------------------ data


def corpus_texts(backend: str = "files") -> tuple[str, str]:
  """(train text, validation text): tiny Shakespeare 90/10 split + GSM8K train / test."""
  from qstar_jax.data.pipeline import read_gsm8k_split, read_tiny_shakespeare_splits

  sh_train, sh_val = read_tiny_shakespeare_splits(backend=backend)

  def gsm_text(split):
    rows = read_gsm8k_split(split, backend=backend)
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)

  return sh_train + "\n\n" + gsm_text("train"), sh_val + "\n\n" + gsm_text("test")


def prepare_data(cfg: QuestScalingConfig, out: pathlib.Path):
  """Trains (or reuses) the SentencePiece tokenizer; returns (train windows, val windows)."""
  from qstar_jax.data.pipeline import pack_tokens
  from qstar_jax.models.tokenizer import SentencePieceTokenizer, train_sentencepiece

  train_text, val_text = corpus_texts(cfg.data_backend)
  prefix = out / "tokenizer" / f"spm{cfg.vocab_size}"
  model_file = prefix.with_suffix(".model")
  if model_file.is_file():
    tok = SentencePieceTokenizer(model_file)
  else:
    tok = train_sentencepiece(train_text, vocab_size=cfg.vocab_size, model_prefix=prefix)
  cache = out / "tokenizer" / f"tokens{cfg.vocab_size}.npz"
  if cache.is_file():
    data = np.load(cache)
    train_ids, val_ids = data["train"], data["val"]
  else:
    train_ids = np.asarray(tok.encode(train_text), np.int32)
    val_ids = np.asarray(tok.encode(val_text), np.int32)
    np.savez(cache, train=train_ids, val=val_ids)
  t = cfg.train.seq_len
  train_windows = pack_tokens(train_ids, t)
  val_all = pack_tokens(val_ids, t)
  pick = np.linspace(0, len(val_all) - 1, min(cfg.val_sequences, len(val_all))).astype(int)
  return tok, train_windows, val_all[pick]


# ----------------------------------------------------------------------------------- model


def model_config(cfg: QuestScalingConfig, size: tuple[int, int, int, int], run: str):
  from qstar_jax.models.config import LlamaConfig
  from qstar_jax.quant import QuantConfig

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


def token_nll(graphdef):
  """fn(params, windows [B, T + 1]) -> [B, T] next-token losses `-log softmax(logits)[target]`
  (float32)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def nll(params, batch):
    logits = nnx.merge(graphdef, params)(batch[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]

  return nll


def lm_loss_fn(graphdef):
  """Mean next-token cross entropy `-1/(B T) sum log softmax(logits)[target]` (float32)."""
  nll = token_nll(graphdef)

  def loss_fn(params, batch, rng_key=None):
    del rng_key
    return nll(params, batch).mean(), {}

  return loss_fn


def optimizer_config(ts: TrainSettings, steps: int):
  """AdamW settings of one run of `steps` steps (warmup a fraction of them)."""
  from qstar_jax.training.optim import OptimizerConfig

  return OptimizerConfig(lr=ts.lr, warmup_steps=max(1, int(ts.warmup_frac * steps)),
                         weight_decay=ts.weight_decay, grad_clip_norm=ts.grad_clip_norm)


def count_params(params) -> int:
  import jax

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def quantized_param_count(model_cfg) -> int:
  """Parameters of the quantized block projections (the rest stays 16-bit)."""
  d, f, layers = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers
  hd = model_cfg.head_dim or d // model_cfg.num_heads
  attn = d * model_cfg.num_heads * hd * 2 + d * model_cfg.num_kv_heads * hd * 2
  return layers * (attn + 3 * d * f)


def train_one(cfg: QuestScalingConfig, size, run: str, steps: int, train_windows, val_windows,
              run_dir: pathlib.Path) -> dict[str, Any]:
  """Trains one (size, precision) model; returns its results.json row (+ "size_bits")."""
  import jax.numpy as jnp
  from flax import nnx

  from qstar_jax.models.llama import Llama
  from qstar_jax.training.config import config_to_dict
  from qstar_jax.training.optim import lr_schedule, make_optimizer
  from qstar_jax.training.train_loop import TrainLoopConfig, train

  done_file = run_dir / "result.json"
  if done_file.is_file():
    return json.loads(done_file.read_text())
  mcfg = model_config(cfg, size, run)
  ts = cfg.train
  # Same initialisation for every precision of a size: rngs from the seed only.
  model = Llama(mcfg, rngs=nnx.Rngs(ts.seed))
  graphdef, params = nnx.split(model)
  loss_fn = lm_loss_fn(graphdef)
  ocfg = optimizer_config(ts, steps)
  optimizer = make_optimizer(ocfg, total_steps=steps)
  b = ts.batch_size

  def train_batches(start_step):
    step = start_step
    while True:
      rng = np.random.default_rng([ts.seed, step])
      idx = rng.integers(0, len(train_windows), size=b)
      yield jnp.asarray(train_windows[idx])
      step += 1

  eb = cfg.eval_batch_size

  def eval_batches():
    for i in range(0, len(val_windows) - eb + 1, eb):
      yield jnp.asarray(val_windows[i:i + eb])

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
  done_file.write_text(json.dumps(row, indent=2))
  return row


def window_losses(run_dir: str | pathlib.Path, *, batch_size: int = 32) -> np.ndarray:
  """Next-token loss of a finished run's final checkpoint on every validation window.

  The table's `val_loss` averages `val_sequences` evenly spaced windows; this evaluates all of
  them (the whole validation text), one mean loss per window, float64 [num windows]. Used by
  `experiments.quest_seeds --full-val` to pair two runs window by window, which separates the
  evaluation's sampling error from the training seed's spread.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from qstar_jax.data.pipeline import pack_tokens
  from qstar_jax.models.llama import Llama
  from qstar_jax.training.checkpoint import CheckpointManager, abstract_like
  from qstar_jax.training.config import config_from_dict
  from qstar_jax.training.optim import make_optimizer

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
  graphdef, params = nnx.split(Llama(model_config(cfg, size, run), rngs=nnx.Rngs(ts.seed)))
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

  nll = token_nll(graphdef)
  per_window = jax.jit(lambda p, batch: nll(p, batch).mean(axis=-1))

  parts = [np.asarray(per_window(params, jnp.asarray(windows[i:i + batch_size])))
           for i in range(0, len(windows), batch_size)]
  return np.concatenate(parts).astype(np.float64)


# --------------------------------------------------------------------------------- outputs


def _label(row) -> str:
  if row["method"] == "bf16":
    return "BF16"
  return f"{'QuEST' if row['method'] == 'quest' else 'STE'} W{row['w_bits']}A{row['a_bits']}"


def results_table(rows: list[dict[str, Any]]) -> str:
  from qstar_jax.training.results import markdown_table

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
  from qstar_jax.training.results import markdown_table

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
  from qstar_jax.training.results import new_figure, save_plot

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


def run_experiment(cfg: QuestScalingConfig) -> dict[str, Any]:
  from qstar_jax.training.config import config_to_dict
  from qstar_jax.training.results import write_results

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
                        out / "runs" / name)
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
  from qstar_jax.training.config import parse_config

  cfg = parse_config(QuestScalingConfig, sys.argv[1:] if argv is None else argv,
                     presets_dir=PRESETS)
  return run_experiment(cfg)


if __name__ == "__main__":
  main()
