"""Step-segmented reasoning data for the value-learning losses: trajectories, preference pairs
from MCTS annotation, fixed-shape batches, and a deterministic, resumable batch iterator.

- `Trajectory`: one sampled solution split into steps (prompt ids, step id lists, the
  verifier's outcome reward, problem metadata, optional texts); `PreferencePair`: a shared
  context (prompt + earlier steps) with a chosen and a rejected next step and their Q-values.
  Both are host records (Python ints and lists, not arrays) with ``to_json`` / ``from_json``;
  `write_reasoning_jsonl` / `read_reasoning_jsonl` store them one per line, and a bad line is
  an error naming its line number.
- `preference_pairs_from_annotations`: pairs from the records of
  `qstar_jax.search.steps.lm_mcts.mcts_annotations` (Zhai et al.: at each depth of the best
  trajectory, chosen = the sibling with the highest Q, rejected = the lowest).
- `pad_pairs` / `pad_trajectories`: fixed ``[B, W]`` token arrays for a decoder fed
  ``tokens[:, :-1]`` and scored on ``targets = tokens[:, 1:]``. Masks and step indices are
  ``[B, W - 1]``, aligned with the targets: position ``t`` refers to token ``t + 1``. So
  ``token_log_probs(logits, tokens[:, 1:], mask)`` (`qstar_jax.losses`) sums exactly the
  step's tokens, and ``step_log_probs(token_lp, step_index, num_steps)`` groups a
  trajectory's tokens by step.
- `pair_batches` / `trajectory_batches`: batches through `qstar_jax.data.pipeline`
  (`iterate_batches`): batch ``s`` is a pure function of ``(seed, s)``, so a resumed run sees
  the batches an uninterrupted run sees; one width for the whole data set, so one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import struct

from qstar_jax.data.pipeline import iterate_batches

__all__ = [
  "PairBatch",
  "PairExtraction",
  "PreferencePair",
  "Trajectory",
  "TrajectoryBatch",
  "pad_pairs",
  "pad_trajectories",
  "pair_batches",
  "preference_pairs_from_annotations",
  "read_reasoning_jsonl",
  "split_steps",
  "trajectory_batches",
  "write_reasoning_jsonl",
]


def _ids(value: Any, what: str) -> tuple[int, ...]:
  """``value`` as a tuple of non-negative ints, else a ValueError naming ``what``."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
    raise ValueError(f"{what} = {value!r}: expected a list of token ids")
  out = tuple(value)
  bad = [v for v in out if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0]
  if bad:
    raise ValueError(f"{what} holds {bad[0]!r}: expected non-negative integer token ids")
  return tuple(int(v) for v in out)


def _field(obj: Mapping[str, Any], key: str, kind: str) -> Any:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{kind} record is a {type(obj).__name__}: expected a JSON object")
  if key not in obj:
    raise ValueError(f"{kind} record has no {key!r} (keys: {sorted(obj)})")
  return obj[key]


# ------------------------------------------------------------------------------------ records


# Host records, not flax.struct: their fields are ragged Python lists, never traced.
@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One solution split into steps, with the verifier's outcome.

  ``prompt_ids`` holds everything before the first step (BOS included); ``steps`` the step id
  lists in order (the last one ends with EOS when the solution finished). ``problem`` is
  JSON-serialisable metadata; ``prompt_text`` / ``step_texts`` are optional decoded texts.
  """

  prompt_ids: tuple[int, ...]
  steps: tuple[tuple[int, ...], ...]
  reward: float
  problem: Any = None
  prompt_text: str | None = None
  step_texts: tuple[str, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "prompt_ids", _ids(self.prompt_ids, "prompt_ids"))
    object.__setattr__(self, "steps", tuple(_ids(s, f"steps[{i}]")
                                            for i, s in enumerate(self.steps)))
    if not self.prompt_ids:
      raise ValueError("prompt_ids is empty: expected at least one token (BOS) before the steps")
    empty = [i for i, s in enumerate(self.steps) if not s]
    if empty:
      raise ValueError(f"steps[{empty[0]}] is empty: expected at least one token per step")
    reward = float(self.reward)
    if not math.isfinite(reward):
      raise ValueError(f"reward = {self.reward!r}: expected a finite number")
    object.__setattr__(self, "reward", reward)
    if self.step_texts is not None:
      texts = tuple(self.step_texts)
      if len(texts) != len(self.steps):
        raise ValueError(f"{len(texts)} step_texts for {len(self.steps)} steps")
      object.__setattr__(self, "step_texts", texts)

  @property
  def ids(self) -> tuple[int, ...]:
    """Prompt and steps concatenated."""
    return self.prompt_ids + tuple(t for s in self.steps for t in s)

  def to_json(self) -> dict[str, Any]:
    return {"prompt_ids": list(self.prompt_ids), "steps": [list(s) for s in self.steps],
            "reward": self.reward, "problem": self.problem, "prompt_text": self.prompt_text,
            "step_texts": None if self.step_texts is None else list(self.step_texts)}

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> Trajectory:
    steps = _field(obj, "steps", "trajectory")
    if not isinstance(steps, list):
      raise ValueError(f"trajectory steps = {steps!r}: expected a list of id lists")
    return cls(prompt_ids=_field(obj, "prompt_ids", "trajectory"), steps=tuple(steps),
               reward=_field(obj, "reward", "trajectory"), problem=obj.get("problem"),
               prompt_text=obj.get("prompt_text"), step_texts=obj.get("step_texts"))


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A shared context and two candidate next steps, ``chosen`` preferred over ``rejected``.

  ``context_ids``: prompt + the trajectory's earlier steps; ``chosen_q`` / ``rejected_q``: the
  MCTS Q-values; ``record_index`` / ``depth``: where the pair came from (annotation record and
  position along its trajectory, 0 = first step).
  """

  context_ids: tuple[int, ...]
  chosen_ids: tuple[int, ...]
  rejected_ids: tuple[int, ...]
  chosen_q: float
  rejected_q: float
  record_index: int = 0
  depth: int = 0
  chosen_text: str | None = None
  rejected_text: str | None = None

  def __post_init__(self):
    for name in ("context_ids", "chosen_ids", "rejected_ids"):
      ids = _ids(getattr(self, name), name)
      if not ids:
        raise ValueError(f"{name} is empty: expected at least one token")
      object.__setattr__(self, name, ids)
    object.__setattr__(self, "chosen_q", float(self.chosen_q))
    object.__setattr__(self, "rejected_q", float(self.rejected_q))

  def to_json(self) -> dict[str, Any]:
    return {"context_ids": list(self.context_ids), "chosen_ids": list(self.chosen_ids),
            "rejected_ids": list(self.rejected_ids), "chosen_q": self.chosen_q,
            "rejected_q": self.rejected_q, "record_index": self.record_index,
            "depth": self.depth, "chosen_text": self.chosen_text,
            "rejected_text": self.rejected_text}

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> PreferencePair:
    required = ("context_ids", "chosen_ids", "rejected_ids", "chosen_q", "rejected_q")
    return cls(**{k: _field(obj, k, "preference pair") for k in required},
               record_index=int(obj.get("record_index", 0)), depth=int(obj.get("depth", 0)),
               chosen_text=obj.get("chosen_text"), rejected_text=obj.get("rejected_text"))


def write_reasoning_jsonl(path: str | pathlib.Path,
                records: Iterable[Trajectory | PreferencePair]) -> pathlib.Path:
  """Writes ``record.to_json()`` one per line (ids and texts); returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for record in records:
      f.write(json.dumps(record.to_json()) + "\n")
  return path


def read_reasoning_jsonl(path: str | pathlib.Path,
               record_type: type[Trajectory] | type[PreferencePair] = Trajectory) -> list[Any]:
  """The records of a file written by `write_reasoning_jsonl` (blank lines skipped).

  Raises:
    ValueError: a line that is not JSON or not a valid record, naming the file and line number.
  """
  path = pathlib.Path(path)
  out = []
  with path.open() as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        out.append(record_type.from_json(json.loads(line)))
      except (ValueError, TypeError) as e:
        raise ValueError(f"{path}:{number}: bad {record_type.__name__} line: {e}") from None
  return out


def split_steps(ids: Sequence[int], *, stop_ids: Sequence[int]) -> list[list[int]]:
  """Generated ids cut into steps: each step ends just after a stop id (newline, EOS); a tail
  without one (a cut-off solution) is the last step. Nothing after the first EOS-like stop is
  dropped here: pass ids up to EOS (as `generate_solutions` returns them).

  Examples:
    >>> split_steps([5, 6, 9, 7, 9, 8, 2], stop_ids=[9, 2])
    [[5, 6, 9], [7, 9], [8, 2]]
    >>> split_steps([5, 9, 7], stop_ids=[9, 2])
    [[5, 9], [7]]
  """
  stops = {int(s) for s in stop_ids}
  steps, current = [], []
  for t in ids:
    current.append(int(t))
    if int(t) in stops:
      steps.append(current)
      current = []
  if current:
    steps.append(current)
  return steps


# ------------------------------------------------------------------- pairs from MCTS annotation


@dataclasses.dataclass(frozen=True)
class PairExtraction:
  """Pairs from annotation records, with what was looked at and what was dropped.

  ``num_depths``: depths examined; ``skipped_few_q``: depths with fewer than two siblings that
  have a Q-value; ``dropped_tie``: highest Q equal to lowest (no preference);
  ``dropped_identical``: chosen and rejected with the same ids; ``dropped_small_gap``: a Q gap
  below ``min_q_gap``.
  """

  pairs: tuple[PreferencePair, ...]
  num_records: int
  num_depths: int
  skipped_few_q: int
  dropped_tie: int
  dropped_identical: int
  dropped_small_gap: int


def preference_pairs_from_annotations(
  records: Sequence[Mapping[str, Any]],
  *,
  prompt_ids: Sequence[Sequence[int]] | None = None,
  min_q_gap: float = 0.0,
) -> PairExtraction:
  """Step preference pairs from MCTS annotation records (the dicts `mcts_annotations` writes).

  At depth ``i`` of a record's best trajectory, among the siblings with a Q-value (``q`` None:
  never visited, skipped), chosen = the highest Q and rejected = the lowest (the first in
  sibling order among equals); the context is the prompt followed by the trajectory's steps
  ``0 .. i - 1``. A pair is dropped when the two Q-values are equal, when the chosen and
  rejected ids are identical (duplicate samples), or when ``chosen_q - rejected_q <
  min_q_gap``; the counts are in the result.

  Args:
    records: annotation dicts with "trajectory" (steps with "node", "ids") and "depths"
      (each with "parent" and "siblings": "ids", "q", optional "text").
    prompt_ids: the prompt ids of each record (``[BOS] + encode(prompt)``), one per record;
      None: each record must hold its own under "prompt_ids".
    min_q_gap: the smallest Q gap kept (>= 0).

  Raises:
    ValueError: a malformed record (naming its index), or no pair at all (naming how many
      records and depths were looked at and why each was dropped).
  """
  if not (math.isfinite(min_q_gap) and min_q_gap >= 0):
    raise ValueError(f"min_q_gap = {min_q_gap!r}: expected a finite number >= 0")
  if prompt_ids is not None and len(prompt_ids) != len(records):
    raise ValueError(f"{len(prompt_ids)} prompt_ids for {len(records)} annotation records")
  pairs: list[PreferencePair] = []
  counts = dict(num_depths=0, skipped_few_q=0, dropped_tie=0, dropped_identical=0,
                dropped_small_gap=0)
  for r, record in enumerate(records):
    where = f"annotation record {r}"
    if prompt_ids is not None:
      prompt = _ids(prompt_ids[r], f"prompt_ids[{r}]")
    elif isinstance(record, Mapping) and "prompt_ids" in record:
      prompt = _ids(record["prompt_ids"], f"{where} prompt_ids")
    else:
      raise ValueError(f"{where} has no 'prompt_ids' and no prompt_ids argument was given")
    trajectory = _field(record, "trajectory", where)
    depths = _field(record, "depths", where)
    if len(depths) > len(trajectory):
      raise ValueError(f"{where}: {len(depths)} depths for a trajectory of "
                       f"{len(trajectory)} steps: expected at most one depth per step")
    for i, depth in enumerate(depths):
      counts["num_depths"] += 1
      if i > 0 and depth.get("parent") != trajectory[i - 1].get("node"):
        raise ValueError(f"{where} depth {i}: parent {depth.get('parent')} is not the "
                         f"trajectory's step {i - 1} (node {trajectory[i - 1].get('node')})")
      scored = [s for s in _field(depth, "siblings", f"{where} depth {i}")
                if s.get("q") is not None]
      if len(scored) < 2:
        counts["skipped_few_q"] += 1
        continue
      qs = [float(s["q"]) for s in scored]
      best, worst = scored[int(np.argmax(qs))], scored[int(np.argmin(qs))]
      gap = float(best["q"]) - float(worst["q"])
      chosen = _ids(_field(best, "ids", f"{where} depth {i} sibling"), f"{where} ids")
      rejected = _ids(_field(worst, "ids", f"{where} depth {i} sibling"), f"{where} ids")
      if gap <= 0:
        counts["dropped_tie"] += 1
      elif chosen == rejected:
        counts["dropped_identical"] += 1
      elif gap < min_q_gap:
        counts["dropped_small_gap"] += 1
      else:
        context = prompt + tuple(t for s in trajectory[:i]
                                 for t in _ids(_field(s, "ids", f"{where} step"), where))
        pairs.append(PreferencePair(
          context_ids=context, chosen_ids=chosen, rejected_ids=rejected,
          chosen_q=float(best["q"]), rejected_q=float(worst["q"]), record_index=r, depth=i,
          chosen_text=best.get("text"), rejected_text=worst.get("text")))
  if not pairs:
    raise ValueError(
      f"no preference pair from {len(records)} annotation records and {counts['num_depths']} "
      f"depths: {counts['skipped_few_q']} with fewer than two Q-valued siblings, "
      f"{counts['dropped_tie']} ties, {counts['dropped_identical']} identical chosen/rejected, "
      f"{counts['dropped_small_gap']} with a Q gap below min_q_gap={min_q_gap}")
  return PairExtraction(pairs=tuple(pairs), num_records=len(records), **counts)


# ------------------------------------------------------------------------------------ padding


@struct.dataclass
class PairBatch:
  """Chosen and rejected sequences (context + step) of one width; masks mark the step's targets.

  For a decoder fed ``tokens[:, :-1]``: ``token_log_probs(logits, tokens[:, 1:], mask)``.
  """

  chosen_tokens: np.ndarray     # [B, W] int32, pad_id after the step
  chosen_mask: np.ndarray       # [B, W - 1] bool, True where tokens[:, 1:] is a step token
  rejected_tokens: np.ndarray   # [B, W] int32
  rejected_mask: np.ndarray     # [B, W - 1] bool
  chosen_q: np.ndarray          # [B] float32
  rejected_q: np.ndarray        # [B] float32


@struct.dataclass
class TrajectoryBatch:
  """Whole trajectories of one width, each target token labelled with its step."""

  tokens: np.ndarray      # [B, W] int32, pad_id after the solution
  step_index: np.ndarray  # [B, W - 1] int32, step of token t + 1 (0 = first); -1 prompt/padding
  mask: np.ndarray        # [B, W - 1] bool, step_index >= 0
  rewards: np.ndarray     # [B] float32 outcome rewards
  num_steps: np.ndarray   # [B] int32 steps per trajectory (after any truncation)


def _pair_length(pair: PreferencePair) -> int:
  return len(pair.context_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def _round_up(n: int, bucket: int) -> int:
  return -(-n // bucket) * bucket


def _width(lengths: Sequence[int], width: int | None, bucket: int) -> int:
  if bucket < 1:
    raise ValueError(f"bucket = {bucket}: expected >= 1")
  if width is None:
    return _round_up(max(max(lengths), 2), bucket)
  if width < 2:
    raise ValueError(f"width = {width}: expected >= 2 (one input and one target)")
  return width


def _too_long(what: str, length: int, width: int) -> ValueError:
  return ValueError(f"{what} has {length} tokens > width={width}: raise width or pass "
                    "truncate=True (the tokens before the step must keep at least one)")


def pad_pairs(pairs: Sequence[PreferencePair], *, pad_id: int, width: int | None = None,
              bucket: int = 16, truncate: bool = False) -> PairBatch:
  """Preference pairs as fixed-shape arrays for step-level DPO.

  Args:
    pairs: the pairs of one batch.
    pad_id: the padding token.
    width: tokens per sequence; None: the longest sequence rounded up to a multiple of
      ``bucket`` (few distinct shapes, few compilations).
    truncate: a sequence longer than ``width`` loses tokens from the left of its context (the
      step is kept whole); False: such a sequence is an error.

  Raises:
    ValueError: empty ``pairs``; a sequence too long (naming the pair); a step that does not
      fit with one context token even when truncating.
  """
  if not pairs:
    raise ValueError("pad_pairs got no pairs: expected at least one")
  width = _width([_pair_length(p) for p in pairs], width, bucket)
  b = len(pairs)
  out = {k: np.full((b, width), pad_id, np.int32) for k in ("chosen", "rejected")}
  masks = {k: np.zeros((b, width - 1), bool) for k in ("chosen", "rejected")}
  for i, pair in enumerate(pairs):
    for kind, step in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
      context = pair.context_ids
      if len(context) + len(step) > width:
        if not truncate or len(step) + 1 > width:
          raise _too_long(f"pair {i} ({kind})", len(context) + len(step), width)
        context = context[len(context) + len(step) - width:]
      n = len(context)
      out[kind][i, :n + len(step)] = context + step
      masks[kind][i, n - 1:n - 1 + len(step)] = True  # target t is token t + 1
  return PairBatch(chosen_tokens=out["chosen"], chosen_mask=masks["chosen"],
                   rejected_tokens=out["rejected"], rejected_mask=masks["rejected"],
                   chosen_q=np.array([p.chosen_q for p in pairs], np.float32),
                   rejected_q=np.array([p.rejected_q for p in pairs], np.float32))


def pad_trajectories(trajectories: Sequence[Trajectory], *, pad_id: int,
                     width: int | None = None, bucket: int = 16,
                     truncate: bool = False) -> TrajectoryBatch:
  """Trajectories as fixed-shape arrays for OREO, PRM and value losses.

  ``step_index[b, t]`` is the step of token ``t + 1`` (the target of position ``t``), -1 for
  prompt tokens and padding; feed it to ``losses.step_log_probs`` with ``num_steps`` at least
  ``max(batch.num_steps)``.

  Args as in `pad_pairs`; ``truncate`` cuts a trajectory on the right (its last steps are
  shortened or lost; ``num_steps`` counts what is left); the prompt plus one step token must fit.
  """
  if not trajectories:
    raise ValueError("pad_trajectories got no trajectories: expected at least one")
  width = _width([len(t.ids) for t in trajectories], width, bucket)
  b = len(trajectories)
  tokens = np.full((b, width), pad_id, np.int32)
  step_index = np.full((b, width - 1), -1, np.int32)
  num_steps = np.zeros(b, np.int32)
  for i, traj in enumerate(trajectories):
    ids = traj.ids
    n = len(traj.prompt_ids)
    if len(ids) > width and (not truncate or n + 1 > width):
      raise _too_long(f"trajectory {i}", len(ids), width)
    labels = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(traj.steps)]
                            or [np.zeros(0, np.int32)])
    kept = min(len(ids), width)
    tokens[i, :kept] = ids[:kept]
    step_index[i, n - 1:kept - 1] = labels[:kept - n]
    num_steps[i] = labels[kept - n - 1] + 1 if kept > n else 0
  return TrajectoryBatch(tokens=tokens, step_index=step_index, mask=step_index >= 0,
                         rewards=np.array([t.reward for t in trajectories], np.float32),
                         num_steps=num_steps)


# ---------------------------------------------------------------------------------- iterators


def _padded_batches(examples: Sequence[Any], lengths: Sequence[int],
                    pad: Callable[..., Any], *, batch_size: int, seed: int, pad_id: int,
                    width: int | None, bucket: int, truncate: bool, start_step: int,
                    num_steps: int | None, shuffle: bool, backend: str) -> Iterator[Any]:
  if not examples:
    raise ValueError("no examples to batch: expected at least one")
  collate = functools.partial(pad, pad_id=pad_id, width=_width(lengths, width, bucket),
                              truncate=truncate)
  return iterate_batches(list(examples), batch_size=batch_size, seed=seed,
                         start_step=start_step, num_steps=num_steps, shuffle=shuffle,
                         collate=collate, backend=backend)


def pair_batches(pairs: Sequence[PreferencePair], *, batch_size: int, seed: int, pad_id: int,
                 width: int | None = None, bucket: int = 16, truncate: bool = False,
                 start_step: int = 0, num_steps: int | None = None, shuffle: bool = True,
                 backend: str = "auto") -> Iterator[PairBatch]:
  """Batches (`PairBatch`) ``start_step, start_step + 1, ...`` (see
  `data.pipeline.iterate_batches`: seeded per-epoch order, batch ``s`` a pure function of
  ``(seed, s)``). One width for every batch: ``width``, or the longest pair of the whole set
  rounded up to ``bucket``."""
  return _padded_batches(pairs, [_pair_length(p) for p in pairs], pad_pairs,
                         batch_size=batch_size, seed=seed, pad_id=pad_id, width=width,
                         bucket=bucket, truncate=truncate, start_step=start_step,
                         num_steps=num_steps, shuffle=shuffle, backend=backend)


def trajectory_batches(trajectories: Sequence[Trajectory], *, batch_size: int, seed: int,
                       pad_id: int, width: int | None = None, bucket: int = 16,
                       truncate: bool = False, start_step: int = 0,
                       num_steps: int | None = None, shuffle: bool = True,
                       backend: str = "auto") -> Iterator[TrajectoryBatch]:
  """Batches (`TrajectoryBatch`), as `pair_batches` does for pairs."""
  return _padded_batches(trajectories, [len(t.ids) for t in trajectories], pad_trajectories,
                         batch_size=batch_size, seed=seed, pad_id=pad_id, width=width,
                         bucket=bucket, truncate=truncate, start_step=start_step,
                         num_steps=num_steps, shuffle=shuffle, backend=backend)
