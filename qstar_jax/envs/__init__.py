"""qstar_jax.envs: batched, pure-JAX puzzle environments (Rubik's cube, n-puzzle, the DeepCubeA
test sets) and reasoning tasks (the arithmetic generator; GSM8K answer grading and rewards)."""

from qstar_jax.envs.arithmetic import (
  ArithmeticConfig,
  ArithmeticProblem,
  CorruptedSolution,
  arithmetic_reward,
  check_steps,
  generate_problem,
  generate_problems,
  gsm8k_reward,
  inject_wrong_step,
  problems_from_jsonl,
  problems_to_jsonl,
  read_problems_jsonl,
  split_of,
  write_problems_jsonl,
)
from qstar_jax.envs.cube import Cube3, cube3
from qstar_jax.envs.data import deepcubea_path, load_deepcubea
from qstar_jax.envs.grading import answers_match, extract_final_number, normalize_number
from qstar_jax.envs.npuzzle import NPuzzle, npuzzle
from qstar_jax.envs.puzzle import PuzzleEnv


def make_env(domain: str, actions: int | None = None) -> PuzzleEnv:
  """Environment by name: ``cube3`` (``actions`` 12 or 1884), ``puzzle8``, ``puzzle15``,
  ``puzzle24`` (``actions`` 4 or None)."""
  if domain == "cube3":
    if actions not in (None, 12, 1884):
      raise ValueError(f"cube3 has 12 or 1884 actions, got actions={actions}")
    return cube3(actions == 1884)
  widths = {"puzzle8": 3, "puzzle15": 4, "puzzle24": 5}
  if domain in widths:
    if actions not in (None, 4):
      raise ValueError(f"{domain} has 4 actions, got actions={actions}")
    return npuzzle(widths[domain])
  raise ValueError(f"unknown domain {domain!r}; expected one of cube3, puzzle8, puzzle15, puzzle24")


__all__ = [
  "ArithmeticConfig", "ArithmeticProblem", "CorruptedSolution", "arithmetic_reward",
  "check_steps", "generate_problem", "generate_problems", "gsm8k_reward", "inject_wrong_step",
  "problems_from_jsonl", "problems_to_jsonl", "read_problems_jsonl", "split_of",
  "write_problems_jsonl",
  "answers_match",
  "extract_final_number",
  "normalize_number",
  "Cube3", "NPuzzle", "PuzzleEnv", "cube3", "deepcubea_path", "load_deepcubea", "make_env",
  "npuzzle"]
