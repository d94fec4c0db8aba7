"""experiments.oreo_oracle: the oracle value against hand-built solutions (the first wrong line
found by the task's checker, values zeroed after it), batches matched to their trajectories,
and bad variants refused."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from experiments import oreo_oracle
from qstar_jax.data.reasoning import Trajectory
from qstar_jax.envs.arithmetic import generate_problem, parse_step
from qstar_jax.training.config import parse_config
from qstar_jax.training.value_runs import ValueRunConfig


def _solution(problem, wrong_line: int | None) -> list[str]:
  """The reference lines (and answer line), line ``wrong_line``'s result off by one, the lines
  after it computed from the wrong result (so only that line is wrong)."""
  lines, previous = [], None
  for i, line in enumerate(problem.solution_steps):
    a, op, b, c = parse_step(line)
    a = a if previous is None else previous
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
    if i == wrong_line:
      c += 1
    lines.append(f"{a} {op} {b} = {c}\n")
    previous = c
  return [*lines, f"The answer is {previous}"]


def _trajectory(problem, wrong_line: int | None, ids_from: int) -> Trajectory:
  texts = _solution(problem, wrong_line)
  steps = tuple(tuple(range(ids_from + 10 * i, ids_from + 10 * i + 3)) for i in range(len(texts)))
  return Trajectory(prompt_ids=(1, ids_from), steps=steps, reward=float(wrong_line is None),
                    problem={"problem": dataclasses.asdict(problem)}, step_texts=tuple(texts))


def _problem(min_steps: int = 3):
  return next(p for i in range(100) if (p := generate_problem(7, i)).num_steps >= min_steps)


def test_first_wrong_step_is_the_line_the_checker_rejects():
  problem = _problem()
  assert oreo_oracle.first_wrong_step(_trajectory(problem, None, 100)) == -1
  for line in range(problem.num_steps):
    assert oreo_oracle.first_wrong_step(_trajectory(problem, line, 100)) == line
  # A correct sample keeps the oracle's p everywhere, whatever its lines.
  lucky = dataclasses.replace(_trajectory(problem, 0, 100), reward=1.0)
  assert oreo_oracle.first_wrong_step(lucky) == -1


def test_oracle_values_zero_after_the_wrong_step_only():
  step_index = np.array([[-1, -1, 0, 0, 1, 1, 2, 2, -1],
                         [-1, 0, 0, 1, 1, 2, 2, -1, -1],
                         [-1, 0, 1, 2, -1, -1, -1, -1, -1]])
  values = oreo_oracle.oracle_values(step_index, np.array([1, -1, 0]), 0.25)
  np.testing.assert_array_equal(values[0], [0.25] * 6 + [0.0, 0.0, 0.25])  # padding: no step
  np.testing.assert_array_equal(values[1], [0.25] * 9)
  np.testing.assert_array_equal(values[2], [0.25, 0.25, 0.0, 0.0] + [0.25] * 5)


def test_oracle_batches_match_each_row_to_its_trajectory():
  problem = _problem()
  wrong_lines = [None, 0, 1, 2, None, 1]
  trajectories = [_trajectory(problem, w, 100 + 50 * k) for k, w in enumerate(wrong_lines)]
  cfg = ValueRunConfig(num_steps=3, batch_size=2, seed=3)
  seen = set()
  wrong = [oreo_oracle.first_wrong_step(t) for t in trajectories]
  batches = oreo_oracle.oracle_batches(trajectories, wrong, cfg, pad_id=0, p=0.5)(0)  # endless
  for batch in itertools.islice(batches, 6):
    for row, step_index, values in zip(batch["tokens"], batch["step_index"], batch["values"],
                                       strict=True):
      k = (int(row[1]) - 100) // 50  # prompt_ids = (1, 100 + 50 k)
      seen.add(k)
      w = -1 if wrong_lines[k] is None else wrong_lines[k]
      expected = np.where((w >= 0) & (step_index > w), 0.0, 0.5)
      np.testing.assert_array_equal(values, expected)
      assert (values == 0).any() == (w >= 0 and w + 1 < len(trajectories[k].steps))
  assert seen == set(range(len(trajectories)))


@pytest.mark.parametrize("variants, message", [
  ({}, "variants is empty"),
  ({"a": {"oracle_value": 0.5, "beta": 0.3, "lr": 1e-4}}, "variants.a"),
  ({"a": {"oracle_value": 1.5, "beta": 0.3, "lr": 1e-4, "num_steps": 2}}, "oracle_value = 1.5"),
  ({"a": {"oracle_value": 0.5, "beta": 0.0, "lr": 1e-4, "num_steps": 2}}, "beta = 0.0"),
])
def test_bad_variants_are_refused(variants, message):
  with pytest.raises(ValueError, match=message):
    oreo_oracle.check_variants(variants)


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_presets_load_with_valid_variants(preset):
  cfg = parse_config(oreo_oracle.OreoOracleConfig, [f"preset={preset}"],
                     presets_dir=oreo_oracle.PRESETS)
  oreo_oracle.check_variants(cfg.variants)
  assert cfg.seeds and cfg.oreo.batch_size > 0
