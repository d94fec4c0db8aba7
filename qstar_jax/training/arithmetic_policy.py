"""Training the small arithmetic policy and its outcome value head (the committed
``qstar_jax/assets/arithmetic_policy``).

Pipeline (`train_arithmetic_policy`):

1. **Corpus**: ``num_train_problems`` problems of the train split; a fraction
   ``corrupt_fraction`` of them get an ``inject_wrong_step`` solution (one wrong result carried
   through to a wrong answer), the rest the reference solution. An example is
   ``[BOS] + encode(policy_prompt(question)) + encode(solution) + [EOS]``, right-padded.
2. **Tokenizer**: SentencePiece BPE trained on prompts and solutions, with "\\n" a user-defined
   symbol (always exactly one piece) and digits split, so a step ends at a newline or EOS token.
3. **SFT**: a Llama trained on the project's train loop with the next-token loss of
   `training.lm` restricted to the solution tokens (EOS included):
   ``L = sum_{b,t} w_bt * nll_bt / sum_{b,t} w_bt`` with ``w_bt = 1`` where token ``t + 1`` of
   row ``b`` belongs to the solution. Batches group examples of similar length
   (`length_grouped_batches`), so little compute goes to padding.
4. **Evaluation**: greedy accuracy (``arithmetic_reward``) on ``num_test_problems`` problems of
   the test split (``generate_problems(seed, N, split="test")``), batched `models.decode` with a
   fixed batch and prompt width (one compilation; the first ``slice_problems`` form the first
   batch, so their accuracy is recomputed exactly by the same call on them alone); majority@K
   over K samples at temperature 1 on ``majority_problems`` test problems.
5. **Value head**: M solutions per train problem sampled at temperature 1, scored by
   ``arithmetic_reward``; the frozen policy's final-normed hidden state at the last prompt token,
   after every newline of the solution and at its end (EOS, or the last token of a cut-off
   solution) is regressed onto the outcome (Monte Carlo return, gamma = 1) by ridge-regularised
   least squares (the exact minimiser of the MSE + ``ridge * |w|^2``), fitted on a share of the
   problems and evaluated (MSE, AUC, accuracy at threshold 0.5) on the held-out rest.
6. **Artifacts**: `models.save_arithmetic_policy` writes the folder.

The SFT runs on a device mesh when one is given (``train_arithmetic_policy(cfg, mesh=...)``; the
experiment passes the mesh of ``cfg.mesh``): the Llama is sharded by `qstar_jax.distributed`'s
rules, each batch split over ``data`` x ``fsdp`` (``data.batch_size`` must divide over them), each
process builds only its rows of every batch, and only process 0 writes the artifacts.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qstar_jax.data.pipeline import process_rows
from qstar_jax.distributed import RuntimeConfig, data_shard, is_main_process
from qstar_jax.envs.arithmetic import (
  POLICY_PROMPT_FORMAT,
  ArithmeticConfig,
  ArithmeticProblem,
  arithmetic_reward,
  generate_problems,
  inject_wrong_step,
  policy_prompt,
)
from qstar_jax.envs.grading import answers_match, stated_answer
from qstar_jax.models.arithmetic_policy import (
  ARITHMETIC_POLICY_FILES,
  default_arithmetic_policy_dir,
  save_arithmetic_policy,
)
from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.decoding import decode
from qstar_jax.models.llama import apply_hidden, init_llama
from qstar_jax.models.params import count_params
from qstar_jax.models.tokenizer import SentencePieceTokenizer, train_sentencepiece
from qstar_jax.search.steps.result import vote
from qstar_jax.training.config import config_to_dict
from qstar_jax.training.lm import window_token_nll
from qstar_jax.training.optim import OptimizerConfig, lr_schedule, make_optimizer
from qstar_jax.training.progress import PhaseTimer, progress
from qstar_jax.training.run_setup import (
  check_batch_sizes,
  host_local,
  made_once,
  mesh_ignore_keys,
)
from qstar_jax.training.train_loop import TrainLoopConfig, train

__all__ = [
  "ArithmeticPolicyConfig",
  "PolicyEvalConfig",
  "PolicyModelConfig",
  "SFTDataConfig",
  "ValueFitConfig",
  "binary_auc",
  "build_sft_texts",
  "encode_sft_examples",
  "fit_linear_value",
  "generate_solutions",
  "greedy_accuracy",
  "hidden_states_at",
  "install_arithmetic_policy",
  "length_grouped_batches",
  "majority_answer",
  "sft_loss_fn",
  "step_end_positions",
  "train_arithmetic_policy",
  "train_arithmetic_tokenizer",
  "within_group_auc",
]

BOS_ID, EOS_ID, PAD_ID = 1, 2, 3  # fixed by train_sentencepiece
NEWLINE = "\n"


@dataclasses.dataclass(frozen=True)
class PolicyModelConfig:
  """The Llama's shape (float32, tied embeddings; its vocabulary is ``data.vocab_size``)."""
  hidden_size: int = 128
  intermediate_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2

  def llama_config(self, *, vocab_size: int, max_seq_len: int) -> LlamaConfig:
    return LlamaConfig(
      vocab_size=vocab_size, hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size, num_layers=self.num_layers,
      num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
      max_position_embeddings=max_seq_len, tie_word_embeddings=True, bos_token_id=BOS_ID,
      eos_token_ids=(EOS_ID,))


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  num_train_problems: int = 16000
  corrupt_fraction: float = 0.2   # share of examples whose solution has one wrong step
  vocab_size: int = 512           # SentencePiece pieces (= the model's vocabulary)
  tokenizer_problems: int = 2000  # problems whose prompt + solution train the tokenizer
  seq_len: int = 144              # tokens per example (BOS ... EOS, right-padded)
  batch_size: int = 32
  eval_problems: int = 256        # test-split reference solutions for the eval loss


@dataclasses.dataclass(frozen=True)
class PolicyEvalConfig:
  num_test_problems: int = 500
  slice_problems: int = 64        # the first ones, recorded apart (the tests recompute them)
  batch_size: int = 64            # rows per decode call (fixed: one compilation)
  prompt_width: int = 128         # prompt buffer width (fixed: one compilation)
  max_new_tokens: int = 64
  majority_problems: int = 100    # 0: skip majority@K
  majority_samples: int = 8


@dataclasses.dataclass(frozen=True)
class ValueFitConfig:
  num_problems: int = 512         # train-split problems (after the SFT ones) sampled from
  samples_per_problem: int = 4
  temperature: float = 1.0
  holdout_fraction: float = 0.25  # share of the problems held out for the head's metrics
  ridge: float = 1e-2


@dataclasses.dataclass(frozen=True)
class ArithmeticPolicyConfig:
  out: str = "runs/arithmetic_policy"
  seed: int = 0
  max_seq_len: int = 256          # the model's context (prompt + solution)
  task: ArithmeticConfig = dataclasses.field(default_factory=ArithmeticConfig)
  model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
  data: SFTDataConfig = dataclasses.field(default_factory=SFTDataConfig)
  optim: OptimizerConfig = dataclasses.field(
    default_factory=lambda: OptimizerConfig(lr=3e-3, warmup_steps=50, weight_decay=0.1))
  loop: TrainLoopConfig = dataclasses.field(
    default_factory=lambda: TrainLoopConfig(num_steps=1500, eval_every=500,
                                            checkpoint_every=500))
  eval: PolicyEvalConfig = dataclasses.field(default_factory=PolicyEvalConfig)
  value: ValueFitConfig = dataclasses.field(default_factory=ValueFitConfig)
  install: bool = False           # copy the artifacts into the package's assets folder
  # Where the SFT runs (may change on resume): "" = all devices on data, else e.g. "fsdp=8".
  mesh: str = ""
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)


# ------------------------------------------------------------------------------------ corpus


def build_sft_texts(problems: Sequence[ArithmeticProblem], *, corrupt_fraction: float,
                    seed: int) -> list[tuple[str, str, bool]]:
  """``(prompt, solution, corrupted)`` per problem; the first ``round(corrupt_fraction * N)``
  of a seeded permutation get an ``inject_wrong_step`` solution."""
  if not 0 <= corrupt_fraction <= 1:
    raise ValueError(f"corrupt_fraction={corrupt_fraction}: expected in [0, 1]")
  order = np.random.default_rng(seed).permutation(len(problems))
  corrupted = np.zeros(len(problems), bool)
  corrupted[order[:round(corrupt_fraction * len(problems))]] = True
  out = []
  for i, p in enumerate(problems):
    solution = inject_wrong_step(p, seed=seed).solution if corrupted[i] else p.solution
    out.append((policy_prompt(p.question), solution, bool(corrupted[i])))
  return out


def train_arithmetic_tokenizer(texts: Sequence[str], *, vocab_size: int,
                               model_prefix: str | pathlib.Path) -> SentencePieceTokenizer:
  """SentencePiece BPE on ``texts`` (one per line-chunk) with "\\n" always one piece."""
  return train_sentencepiece("\n".join(texts), vocab_size=vocab_size, model_prefix=model_prefix,
                             user_defined_symbols=(NEWLINE,))


def encode_sft_examples(tokenizer: Any, examples: Sequence[tuple[str, str, bool]], *,
                        seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``tokens [N, seq_len]`` int32 (BOS prompt solution EOS, PAD after) and ``weights
  [N, seq_len - 1]`` float32, 1 where the target token ``t + 1`` belongs to the solution."""
  tokens = np.full((len(examples), seq_len), PAD_ID, np.int32)
  weights = np.zeros((len(examples), seq_len - 1), np.float32)
  for i, (prompt, solution, _) in enumerate(examples):
    prompt_ids = [BOS_ID, *tokenizer.encode(prompt)]
    ids = [*prompt_ids, *tokenizer.encode(solution), EOS_ID]
    if len(ids) > seq_len:
      raise ValueError(f"example {i} has {len(ids)} tokens > data.seq_len={seq_len}: "
                       f"{prompt + solution!r}")
    tokens[i, :len(ids)] = ids
    weights[i, len(prompt_ids) - 1:len(ids) - 1] = 1.0
  return tokens, weights


def sft_loss_fn(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, dict]]:
  """``fn(params, {"tokens" [B, T + 1], "weights" [B, T]}, rng_key=None) -> (L, {})``: the mean
  next-token NLL of `training.lm` over the weighted (solution) targets,
  ``L = sum w * nll / max(sum w, 1)``."""
  nll = window_token_nll(graphdef)

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng_key: jax.Array | None = None):
    del rng_key
    w = batch["weights"]
    return (nll(params, batch["tokens"]) * w).sum() / jnp.maximum(w.sum(), 1.0), {}

  return loss_fn


def length_grouped_batches(tokens: np.ndarray, weights: np.ndarray, *, batch_size: int,
                           seed: int, start_step: int = 0, width_multiple: int = 16,
                           group_batches: int = 64) -> Iterator[dict[str, np.ndarray]]:
  """Batches ``start_step, start_step + 1, ...`` (endless) of examples of similar length.

  Each epoch is a seeded permutation cut into groups of ``group_batches`` batches; a group is
  sorted by length and split into batches, and the epoch's batches are shuffled. A batch keeps
  the columns up to its longest example rounded up to ``width_multiple`` (plus the window's
  extra token), so padding costs little compute and only a few widths (compilations) occur.
  Deterministic in ``(seed, step)``: a resumed run sees the same batches.
  """
  lengths = (tokens != PAD_ID).sum(1)
  per_epoch = len(tokens) // batch_size
  if per_epoch < 1:
    raise ValueError(f"{len(tokens)} examples < batch_size={batch_size}")
  epoch, order = -1, []
  step = start_step
  while True:
    if step // per_epoch != epoch:
      epoch = step // per_epoch
      rng = np.random.default_rng((seed, epoch))
      perm = rng.permutation(len(tokens))[:per_epoch * batch_size]
      group = group_batches * batch_size
      batches = []
      for g in range(0, len(perm), group):
        members = perm[g:g + group]
        members = members[np.argsort(lengths[members], kind="stable")]
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
      order = [batches[i] for i in rng.permutation(len(batches))]
    rows = order[step % per_epoch]
    width = -(-int(lengths[rows].max() - 1) // width_multiple) * width_multiple
    width = min(width, tokens.shape[1] - 1)
    yield {"tokens": tokens[rows, :width + 1], "weights": weights[rows, :width]}
    step += 1


# ------------------------------------------------------------------------------------ decoding


def generate_solutions(graphdef: nnx.GraphDef, params: Any, rng: jax.Array, *,
                       prompt_ids: Sequence[Sequence[int]], greedy: bool,
                       temperature: float = 1.0, max_new_tokens: int, batch_size: int,
                       prompt_width: int, desc: str = "decode") -> list[list[int]]:
  """Generated ids per prompt (up to and including EOS), decoded ``batch_size`` rows per call
  with prompts right-padded to ``prompt_width`` (fixed shapes: one compilation per
  ``greedy``); the last batch is filled with copies of its first prompt. Batch ``i`` samples
  with ``fold_in(rng, i)``."""
  too_long = [i for i, p in enumerate(prompt_ids) if len(p) > prompt_width]
  if too_long:
    raise ValueError(f"prompt {too_long[0]} has {len(prompt_ids[too_long[0]])} tokens > "
                     f"prompt_width={prompt_width}")
  out: list[list[int]] = []
  starts = range(0, len(prompt_ids), batch_size)
  for b, start in enumerate(progress(starts, desc=desc, unit="batch")):
    chunk = list(prompt_ids[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    tokens = np.full((batch_size, prompt_width), PAD_ID, np.int32)
    for i, ids in enumerate(chunk):
      tokens[i, :len(ids)] = ids
    res = decode(graphdef, params, jax.random.fold_in(rng, b), tokens=tokens,
                 lengths=np.array([len(c) for c in chunk], np.int32),
                 max_new_tokens=max_new_tokens, greedy=greedy,
                 temperature=1.0 if greedy else temperature, pad_id=PAD_ID)
    gen, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    out += [gen[i, :lengths[i]].tolist() for i in range(n)]
  return out


def solution_text(tokenizer: Any, ids: Sequence[int]) -> str:
  """The text of generated ids, EOS and PAD dropped."""
  return tokenizer.decode([i for i in ids if i not in (EOS_ID, PAD_ID)])


def greedy_accuracy(graphdef: nnx.GraphDef, params: Any, tokenizer: Any,
                    problems: Sequence[ArithmeticProblem], *, batch_size: int = 64,
                    prompt_width: int = 128, max_new_tokens: int = 64,
                    prompt_format: str = POLICY_PROMPT_FORMAT) -> tuple[float, list[float]]:
  """(mean reward, reward per problem) of the greedy solutions."""
  prompts = [[BOS_ID, *tokenizer.encode(policy_prompt(p.question, prompt_format=prompt_format))]
             for p in problems]
  gens = generate_solutions(graphdef, params, jax.random.key(0), prompt_ids=prompts,
                            greedy=True, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            prompt_width=prompt_width, desc="greedy")
  rewards = [arithmetic_reward(solution_text(tokenizer, g), p)
             for g, p in zip(gens, problems, strict=True)]
  return float(np.mean(rewards)), rewards


def majority_answer(texts: Sequence[str]) -> str | None:
  """The most frequent stated answer among ``texts`` (first seen wins ties); None if none
  states one."""
  return vote([stated_answer(t) for t in texts])


# ------------------------------------------------------------------------------------ value head


def step_end_positions(num_prompt: int, generated: Sequence[int], *, newline_id: int,
                       eos_id: int) -> list[int]:
  """Positions in ``prompt + generated`` whose hidden state ends a state of the step MDP: the
  last prompt token (the root), every newline or EOS of ``generated``, and its last token if
  it ends with neither (a cut-off solution)."""
  positions = [num_prompt - 1]
  positions += [num_prompt + i for i, t in enumerate(generated) if t in (newline_id, eos_id)]
  if generated and generated[-1] not in (newline_id, eos_id):
    positions.append(num_prompt + len(generated) - 1)
  return positions


def hidden_states_at(graphdef: nnx.GraphDef, params: Any, sequences: Sequence[Sequence[int]],
                     positions: Sequence[Sequence[int]], *, batch_size: int,
                     width: int) -> list[np.ndarray]:
  """Final-normed hidden states ``[len(positions[i]), D]`` of each sequence at its positions."""
  forward = jax.jit(lambda p, t: apply_hidden(graphdef, p, t)[0])
  out = []
  for start in progress(range(0, len(sequences), batch_size), desc="value features",
                        unit="batch"):
    chunk = sequences[start:start + batch_size]
    tokens = np.full((batch_size, width), PAD_ID, np.int32)
    for i, s in enumerate(chunk):
      tokens[i, :len(s)] = s
    hidden = np.asarray(forward(params, tokens))
    out += [hidden[i, positions[start + i]] for i in range(len(chunk))]
  return out


def fit_linear_value(features: np.ndarray, targets: np.ndarray, *,
                     ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """``(kernel [D, 1], bias [1])`` minimising ``mean((X w + b - y)^2) + ridge * |w|^2``
  (float64 normal equations on centred data; the bias is not penalised)."""
  x = np.asarray(features, np.float64)
  y = np.asarray(targets, np.float64)
  mx, my = x.mean(0), y.mean()
  xc = x - mx
  gram = xc.T @ xc / len(x) + ridge * np.eye(x.shape[1])
  w = np.linalg.solve(gram, xc.T @ (y - my) / len(x))
  return w[:, None].astype(np.float32), np.array([my - mx @ w], np.float32)


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Probability that a random positive scores above a random negative (ties count 1/2);
  NaN without both classes."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
  pos, neg = scores[labels], scores[~labels]
  if len(pos) == 0 or len(neg) == 0:
    return float("nan")
  greater = (pos[:, None] > neg[None, :]).mean()
  ties = (pos[:, None] == neg[None, :]).mean()
  return float(greater + 0.5 * ties)


def within_group_auc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
  """Mean over groups (e.g. the samples of one problem) holding both classes of the group's
  `binary_auc`: how well the scores rank one problem's correct solutions above its wrong ones,
  which is what best-of-N and value-guided search need. A pooled AUC also rewards scores that
  only tell easy problems from hard ones. NaN when no group holds both classes."""
  scores, labels, groups = np.asarray(scores), np.asarray(labels).astype(bool), np.asarray(groups)
  aucs = [binary_auc(scores[groups == g], labels[groups == g]) for g in np.unique(groups)]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def _value_metrics(pred: np.ndarray, target: np.ndarray, final: np.ndarray,
                   groups: np.ndarray) -> dict[str, float]:
  correct = target > 0.5
  return {
    "mse": float(np.mean((pred - target) ** 2)),
    "auc_all_states": binary_auc(pred, correct),
    "auc_final_states": binary_auc(pred[final], correct[final]),
    "within_problem_auc_final_states": within_group_auc(pred[final], correct[final],
                                                        groups[final]),
    "accuracy_final_states": float(np.mean((pred[final] > 0.5) == correct[final])),
    "mean_value_correct": float(pred[correct].mean()) if correct.any() else float("nan"),
    "mean_value_wrong": float(pred[~correct].mean()) if (~correct).any() else float("nan"),
    "num_states": int(len(pred)),
  }


# ------------------------------------------------------------------------------------ pipeline


def _tokenizer(out: pathlib.Path, cfg: ArithmeticPolicyConfig,
               problems: Sequence[ArithmeticProblem]) -> SentencePieceTokenizer:
  """Trained once per run folder (reused when resuming; on several processes by process 0, the
  others load it); checks the step invariants."""
  path = out / "tokenizer.model"

  def make():
    texts = [policy_prompt(p.question) + p.solution
             for p in problems[:cfg.data.tokenizer_problems]]
    return train_arithmetic_tokenizer(texts, vocab_size=cfg.data.vocab_size,
                                      model_prefix=out / "tokenizer")

  tok = made_once(path, make, lambda: SentencePieceTokenizer(path))
  newline = tok.encode(NEWLINE)
  if len(newline) != 1 or (tok.bos_id, tok.eos_ids, tok.pad_id) != (BOS_ID, (EOS_ID,), PAD_ID):
    raise ValueError(f"tokenizer {path}: newline encodes as {newline}, specials "
                     f"{(tok.bos_id, tok.eos_ids, tok.pad_id)}; expected one id and (1, (2,), 3)")
  return tok


def _readme(command: str, record: dict[str, Any]) -> str:
  value = record["value_head"]
  return (
    "# Arithmetic policy\n\n"
    "A small Llama SFT'd on generated multi-step arithmetic problems "
    "(`qstar_jax.envs.arithmetic`), a fraction of them with one injected wrong step, so that "
    "it makes some mistakes; and a linear outcome value head on its final-normed hidden "
    "states, fitted to the verifier outcome of its own sampled solutions.\n\n"
    f"Made by:\n\n    {command}\n\n"
    f"Greedy test accuracy: {record['greedy_accuracy']:.3f} on {record['num_test_problems']} "
    f"test problems (seed {record['test_seed']}); value head held-out AUC "
    f"{value['heldout']['auc_all_states']:.3f} (all states), "
    f"{value['heldout']['auc_final_states']:.3f} (final states).\n\n"
    "Files: `tokenizer.model` (SentencePiece), `params.npz` (float32, `policy.*` Llama "
    "parameters, `value.kernel`, `value.bias`), `config.json` (Llama config, prompt format, "
    "step delimiter ids, training record). Load with "
    "`qstar_jax.models.arithmetic_policy.load_arithmetic_policy()`.\n")


def install_arithmetic_policy(src: str | pathlib.Path,
                              dst: str | pathlib.Path | None = None) -> pathlib.Path:
  """Copies the artifact files of ``src`` into ``dst`` (default: the package's assets)."""
  src = pathlib.Path(src)
  dst = default_arithmetic_policy_dir() if dst is None else pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for name in ARITHMETIC_POLICY_FILES:
    shutil.copyfile(src / name, dst / name)
  return dst


def train_arithmetic_policy(cfg: ArithmeticPolicyConfig, *, command: str = "",
                            show_progress: bool | None = None,
                            mesh: Mesh | None = None) -> dict[str, Any]:
  """Runs the whole pipeline (module docstring) into ``cfg.out``; returns the record that
  ``config.json`` holds beside the model config. ``mesh``: the SFT's device mesh (None: one
  device)."""
  if mesh is not None:  # before any data or model: the error names the config key
    check_batch_sizes(mesh, {"data.batch_size": cfg.data.batch_size})
  t_start = time.perf_counter()
  timer = PhaseTimer()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  d, e, v = cfg.data, cfg.eval, cfg.value
  with timer.phase("data"):
    train_problems = generate_problems(cfg.seed, d.num_train_problems + v.num_problems,
                                       split="train", config=cfg.task)
    sft_problems, value_problems = (train_problems[:d.num_train_problems],
                                    train_problems[d.num_train_problems:])
    test_problems = generate_problems(cfg.seed, e.num_test_problems, split="test",
                                      config=cfg.task)
    tok = _tokenizer(out, cfg, sft_problems)
    examples = build_sft_texts(sft_problems, corrupt_fraction=d.corrupt_fraction,
                               seed=cfg.seed)
    tokens, weights = encode_sft_examples(tok, examples, seq_len=d.seq_len)
    eval_examples = build_sft_texts(test_problems[:d.eval_problems], corrupt_fraction=0.0,
                                    seed=cfg.seed)
    eval_tokens, eval_weights = encode_sft_examples(tok, eval_examples, seq_len=d.seq_len)
  newline_id = tok.encode(NEWLINE)[0]

  model = init_llama(cfg.model.llama_config(vocab_size=tok.vocab_size,
                                            max_seq_len=cfg.max_seq_len), seed=cfg.seed)
  graphdef, params = nnx.split(model)
  num_steps = cfg.loop.num_steps
  bsz = d.batch_size
  shard = data_shard()  # several processes: each takes its rows of every global batch

  def train_batches(start: int):
    batches = length_grouped_batches(tokens, weights, batch_size=bsz, seed=cfg.seed,
                                     start_step=start)
    return batches if shard is None else (process_rows(b, shard) for b in batches)

  def eval_batches():
    return (process_rows({"tokens": eval_tokens[i:i + bsz], "weights": eval_weights[i:i + bsz]},
                         shard)
            for i in range(0, len(eval_tokens) - bsz + 1, bsz))

  print(f"arithmetic policy: {count_params(params):,} params, vocab {tok.vocab_size}, "
        f"{len(examples)} SFT examples ({d.corrupt_fraction:.0%} corrupted), {num_steps} steps "
        f"x {bsz}", flush=True)
  result = train(
    sft_loss_fn(graphdef), params, optimizer=make_optimizer(cfg.optim, total_steps=num_steps),
    train_batches=train_batches, config=cfg.loop, out_dir=out,
    run_config=config_to_dict(cfg), eval_batches=eval_batches if len(eval_tokens) >= bsz
    else None, lr_fn=lr_schedule(cfg.optim, total_steps=num_steps),
    show_progress=show_progress, ignore_config_keys=("out", "install", *mesh_ignore_keys()),
    mesh=mesh)
  params = host_local(result.params)  # several processes: whole on each for what follows

  with timer.phase("greedy"):
    accuracy, rewards = greedy_accuracy(
      graphdef, params, tok, test_problems, batch_size=e.batch_size,
      prompt_width=e.prompt_width, max_new_tokens=e.max_new_tokens)
  slice_n = min(e.slice_problems, len(test_problems))
  print(f"greedy accuracy {accuracy:.3f} on {len(test_problems)} test problems", flush=True)

  rng = jax.random.key(cfg.seed)
  record: dict[str, Any] = {}
  if e.majority_problems > 0:
    with timer.phase("majority"):
      problems = test_problems[:e.majority_problems]
      prompts = [[BOS_ID, *tok.encode(policy_prompt(p.question))]
                 for p in problems for _ in range(e.majority_samples)]
      gens = generate_solutions(graphdef, params, jax.random.fold_in(rng, 1), prompt_ids=prompts,
                                greedy=False, max_new_tokens=e.max_new_tokens,
                                batch_size=e.batch_size, prompt_width=e.prompt_width,
                                desc="majority")
      texts = [solution_text(tok, g) for g in gens]
      k = e.majority_samples
      votes = [majority_answer(texts[i * k:(i + 1) * k]) for i in range(len(problems))]
      record["majority"] = {
        "num_samples": k, "num_problems": len(problems),
        "accuracy": float(np.mean([a is not None and answers_match(a, str(p.answer))
                                   for a, p in zip(votes, problems, strict=True)])),
        "sample_accuracy": float(np.mean([arithmetic_reward(t, problems[i // k])
                                          for i, t in enumerate(texts)])),
        "greedy_accuracy_same_problems": float(np.mean(rewards[:len(problems)])),
        "pass_at_k": float(np.mean([max(arithmetic_reward(t, problems[i])
                                        for t in texts[i * k:(i + 1) * k])
                                    for i in range(len(problems))])),
      }
      print(f"majority@{k} {record['majority']}", flush=True)

  with timer.phase("value"):
    m = v.samples_per_problem
    prompts = [[BOS_ID, *tok.encode(policy_prompt(p.question))]
               for p in value_problems for _ in range(m)]
    gens = generate_solutions(graphdef, params, jax.random.fold_in(rng, 2), prompt_ids=prompts,
                              greedy=False, temperature=v.temperature,
                              max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                              prompt_width=e.prompt_width, desc="value samples")
    outcomes = np.array([arithmetic_reward(solution_text(tok, g), value_problems[i // m])
                         for i, g in enumerate(gens)], np.float64)
    positions = [step_end_positions(len(p), g, newline_id=newline_id, eos_id=EOS_ID)
                 for p, g in zip(prompts, gens, strict=True)]
    hidden = hidden_states_at(graphdef, params,
                              [p + g for p, g in zip(prompts, gens, strict=True)], positions,
                              batch_size=e.batch_size, width=e.prompt_width + e.max_new_tokens)
    n_fit = len(value_problems) - round(v.holdout_fraction * len(value_problems))
    rows = np.repeat(np.arange(len(gens)), [len(p) for p in positions])
    x = np.concatenate(hidden)
    y = outcomes[rows]
    final = np.concatenate([np.arange(len(p)) == len(p) - 1 for p in positions])
    fit = rows < n_fit * m
    problem = rows // m
    kernel, bias = fit_linear_value(x[fit], y[fit], ridge=v.ridge)
    pred = x @ kernel[:, 0].astype(np.float64) + bias[0]
    record["value_head"] = {
      "num_problems": len(value_problems), "samples_per_problem": m,
      "temperature": v.temperature, "ridge": v.ridge, "fit_problems": n_fit,
      "heldout_problems": len(value_problems) - n_fit,
      "sample_accuracy": float(outcomes.mean()),
      "fit": _value_metrics(pred[fit], y[fit], final[fit], problem[fit]),
      "heldout": _value_metrics(pred[~fit], y[~fit], final[~fit], problem[~fit]),
    }
    print(f"value head held out: {record['value_head']['heldout']}", flush=True)

  record = {
    "prompt_format": POLICY_PROMPT_FORMAT,
    "add_bos": True,
    "newline_id": int(newline_id), "eos_id": EOS_ID, "bos_id": BOS_ID, "pad_id": PAD_ID,
    "step_stop_ids": [int(newline_id), EOS_ID],
    "training_command": command,
    "seed": cfg.seed,
    "test_seed": cfg.seed,
    "task": dataclasses.asdict(cfg.task),
    "greedy_accuracy": accuracy,
    "num_test_problems": len(test_problems),
    "greedy_accuracy_first_slice": float(np.mean(rewards[:slice_n])),
    "slice_problems": slice_n,
    "decode": {"batch_size": e.batch_size, "prompt_width": e.prompt_width,
               "max_new_tokens": e.max_new_tokens},
    **record,
    "num_params": count_params(params),
    "train": {"steps": result.step, "last_train_loss": result.last_train_loss,
              "eval_history": [{"step": s, **mm} for s, mm in result.eval_history],
              "corrupt_fraction": d.corrupt_fraction, "num_train_problems": len(sft_problems),
              "steps_per_s": result.steps_per_s},
    "config": config_to_dict(cfg),
  }
  record["wall_time_s"] = time.perf_counter() - t_start
  record["timings_s"] = {**timer.summary(), **result.timings}
  if not is_main_process():
    return record
  save_arithmetic_policy(out, model=nnx.merge(graphdef, params), value_kernel=kernel,
                         value_bias=bias, tokenizer_path=out / "tokenizer.model", config=record,
                         readme=_readme(command, record))
  if cfg.install:
    print(f"installed into {install_arithmetic_policy(out)}", flush=True)
  return record
