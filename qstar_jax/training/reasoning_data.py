"""N sampled solutions per problem with the verifier's outcomes, as step-segmented
`qstar_jax.data.reasoning.Trajectory` records (the data of OREO, rejection sampling, implicit
PRM and outcome value regression).

`sample_trajectories` decodes with `training.arithmetic_policy.generate_solutions` (fixed
shapes, one compilation) and hands the ids to `trajectories_from_generations`, the host part:
it cuts each generation into steps after every step delimiter (newline, EOS;
`data.reasoning.split_steps`) and scores its text with the reward function.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from qstar_jax.data.reasoning import (
  Trajectory,
  read_reasoning_jsonl,
  split_steps,
  write_reasoning_jsonl,
)
from qstar_jax.distributed import is_main_process
from qstar_jax.envs.arithmetic import (
  POLICY_PROMPT_FORMAT,
  arithmetic_reward,
  generate_problems,
  policy_prompt,
)
from qstar_jax.training.arithmetic_policy import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  generate_solutions,
  solution_text,
)

__all__ = ["TrajectorySampling", "cached_trajectories", "problem_metadata",
           "sample_arithmetic_trajectories", "sample_trajectories",
           "trajectories_from_generations"]


def problem_metadata(problem: Any) -> Any:
  """A JSON-serialisable form of a problem: a dataclass's fields, a mapping as a dict, else
  the value itself."""
  if dataclasses.is_dataclass(problem) and not isinstance(problem, type):
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(problem).items()}
  if isinstance(problem, Mapping):
    return dict(problem)
  return problem


def trajectories_from_generations(
  prompt_ids: Sequence[Sequence[int]],
  generations: Sequence[Sequence[int]],
  problems: Sequence[Any],
  *,
  tokenizer: Any,
  stop_ids: Sequence[int],
  reward_fn: Callable[[str, Any], float] = arithmetic_reward,
  prompt_texts: Sequence[str] | None = None,
  sample_keys: Sequence[tuple[int, int]] | None = None,
) -> list[Trajectory]:
  """One `Trajectory` per generation: its steps (cut after each id of ``stop_ids``), the
  reward ``reward_fn(text, problem)`` of its text (EOS and PAD dropped) and as ``problem``
  ``{"problem": problem_metadata(problem), "problem_index": p, "sample_index": s}`` with
  ``(p, s) = sample_keys[i]`` (the indices left out when ``sample_keys`` is None).

  ``prompt_ids[i]``, ``generations[i]`` and ``problems[i]`` belong together (a problem repeated
  once per sample).
  """
  n = len(generations)
  if len(prompt_ids) != n or len(problems) != n or len(sample_keys or generations) != n:
    raise ValueError(f"{len(prompt_ids)} prompts, {len(generations)} generations, "
                     f"{len(problems)} problems and {len(sample_keys or generations)} "
                     "sample_keys: expected one of each per sample")
  out = []
  for i, (prompt, ids, problem) in enumerate(zip(prompt_ids, generations, problems,
                                                 strict=True)):
    steps = split_steps(ids, stop_ids=stop_ids)
    meta: dict[str, Any] = {"problem": problem_metadata(problem)}
    if sample_keys is not None:
      meta["problem_index"], meta["sample_index"] = (int(k) for k in sample_keys[i])
    out.append(Trajectory(
      prompt_ids=prompt, steps=steps, reward=reward_fn(solution_text(tokenizer, ids), problem),
      problem=meta,
      prompt_text=None if prompt_texts is None else prompt_texts[i],
      step_texts=[tokenizer.decode([t for t in s if t not in (EOS_ID, PAD_ID)]) for s in steps]))
  return out


def sample_trajectories(
  graphdef: nnx.GraphDef,
  params: Any,
  rng: jax.Array,
  *,
  problems: Sequence[Any],
  tokenizer: Any,
  num_samples: int,
  stop_ids: Sequence[int],
  reward_fn: Callable[[str, Any], float] = arithmetic_reward,
  prompt_format: str = POLICY_PROMPT_FORMAT,
  temperature: float = 1.0,
  max_new_tokens: int = 64,
  batch_size: int = 64,
  prompt_width: int = 128,
) -> list[Trajectory]:
  """``num_samples`` sampled solutions per problem (problem-major: the samples of problem 0,
  then problem 1, ...) as trajectory records with the verifier's outcomes.

  Prompts are ``[BOS] + encode(policy_prompt(question))`` (how the arithmetic policy reads
  them); ``stop_ids`` are the step delimiters (the policy's ``step_stop_ids``: newline, EOS).
  Decoding is `generate_solutions` with ``greedy=False`` at ``temperature``.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples = {num_samples}: expected >= 1")
  if not problems:
    raise ValueError("sample_trajectories got no problems: expected at least one")
  texts = [policy_prompt(p.question, prompt_format=prompt_format) for p in problems]
  repeated = [i for i in range(len(problems)) for _ in range(num_samples)]
  prompts = [[BOS_ID, *tokenizer.encode(texts[i])] for i in repeated]
  generations = generate_solutions(graphdef, params, rng, prompt_ids=prompts, greedy=False,
                                   temperature=temperature, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, prompt_width=prompt_width,
                                   desc="samples")
  return trajectories_from_generations(
    prompts, generations, [problems[i] for i in repeated], tokenizer=tokenizer,
    stop_ids=stop_ids, reward_fn=reward_fn, prompt_texts=[texts[i] for i in repeated],
    sample_keys=[(i, j) for i in range(len(problems)) for j in range(num_samples)])


@dataclasses.dataclass(frozen=True)
class TrajectorySampling:
  """How many solutions to sample on which train problems (the data of `experiments.oreo` and
  its diagnostics)."""

  num_problems: int = 256         # train problems per seed
  num_samples: int = 8            # solutions per problem
  temperature: float = 1.0
  problem_seed: int = 1000        # arithmetic: generate_problems(problem_seed + seed, "train")
  max_new_tokens: int = 64
  batch_size: int = 64            # rows per decode call
  prompt_width: int = 128


def sample_arithmetic_trajectories(policy: Any, seed: int,
                                   cfg: TrajectorySampling) -> list[Trajectory]:
  """``cfg.num_samples`` solutions of the arithmetic ``policy`` (an `ArithmeticPolicy`) on each
  of ``cfg.num_problems`` train problems drawn with ``cfg.problem_seed + seed``, sampled with
  the key ``seed`` (`sample_trajectories`): the same seed and settings give the same records."""
  problems = generate_problems(cfg.problem_seed + seed, cfg.num_problems, split="train")
  return sample_trajectories(
    policy.graphdef, policy.params, jax.random.key(seed), problems=problems,
    tokenizer=policy.tokenizer, num_samples=cfg.num_samples, stop_ids=policy.step_stop_ids,
    prompt_format=policy.prompt_format, temperature=cfg.temperature,
    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
    prompt_width=cfg.prompt_width)


def cached_trajectories(path: str | os.PathLike,
                        make: Callable[[], list[Trajectory]]) -> list[Trajectory]:
  """The trajectories of the JSONL file ``path``, or ``make()``'s, written there (process 0;
  whole or absent: a killed run makes them again)."""
  path = pathlib.Path(path)
  if path.exists():
    return read_reasoning_jsonl(path, Trajectory)
  trajectories = make()
  if is_main_process():
    path.parent.mkdir(parents=True, exist_ok=True)
    write_reasoning_jsonl(path.with_suffix(".tmp"), trajectories).replace(path)
  return trajectories
