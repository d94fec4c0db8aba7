"""Multi-step arithmetic word problems: a seeded generator, splits, rewards and step checks.

A small verifiable reasoning task for LM search (MCTS, beam, best-of-N) that a tiny policy can
learn. A problem is a short story built from templates, one sentence per operation::

  Ann has 12 apples. She buys 7 more. Then she gives away 5. How many apples does she have now?

and its solution is one operation per line, then the answer line::

  12 + 7 = 19
  19 - 5 = 14
  The answer is 14

Every intermediate result is a positive integer no larger than ``max_value``: subtraction never
goes below 1, multiplication uses small factors (2..``max_factor``), division is exact.

Reproducibility: problem ``i`` of a split is a pure function of ``(seed, split, i)``
(``generate_problem``), so a dataset of any size, or any slice of it, is regenerated exactly.

Splits: the split of a problem is a hash of its computation (start value and the operations
with their operands, e.g. ``"12 + 7 - 5"``), not of its wording, so the test split can never hold
a training problem, nor the same computation told with another name or object. The hash does
not depend on the seed or the difficulty: a train set made with any seed and any
``ArithmeticConfig`` never overlaps a test set made with any other. ``generate_problem`` draws
candidates from its own random stream until one falls in the requested split (about 1 in 10
falls in ``"test"``).

Rewards: ``arithmetic_reward`` and ``gsm8k_reward`` share one interface,
``(solution_text, problem) -> 1.0 | 0.0``, and one rule (``stated_answer_reward``): the text
must state an answer ("The answer is N", "#### N", "\\boxed{N}") and the stated number must
equal the reference (``qstar_jax.envs.grading``). A text that stops before stating an answer
earns 0 even when its last equation holds the right number, so a search never rewards an
unfinished solution as if it were finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qstar_jax.envs.grading import (
  answers_match,
  extract_final_number,
  stated_answer,
  states_answer,
)

__all__ = [
  "OPERATIONS",
  "POLICY_PROMPT_FORMAT",
  "SPLITS",
  "TEST_FRACTION",
  "ArithmeticConfig",
  "ArithmeticProblem",
  "CorruptedSolution",
  "arithmetic_reward",
  "check_steps",
  "format_solution",
  "generate_problem",
  "generate_problems",
  "gsm8k_reward",
  "inject_wrong_step",
  "parse_step",
  "policy_prompt",
  "problems_from_jsonl",
  "problems_to_jsonl",
  "read_problems_jsonl",
  "split_of",
  "stated_answer_reward",
  "write_problems_jsonl",
]

SPLITS = ("train", "test")
OPERATIONS = ("+", "-", "*", "/")
# Share of all computations that belong to the test split. A module constant, not a config
# field: a per-dataset fraction would let a train set made with one fraction overlap a test set
# made with another.
TEST_FRACTION = 0.1
_HASH_BUCKETS = 1000
# Candidates drawn per problem before giving up: a test problem needs about 10 on average;
# only a config with very few distinct computations (all hashed to the other split) runs out.
_MAX_CANDIDATES = 2000

_STEP = re.compile(r"^\s*(-?\d+)\s*([-+*/])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*$")

# (name, subject pronoun, object pronoun)
_PEOPLE = (
  ("Ann", "she", "her"), ("Ben", "he", "him"), ("Cara", "she", "her"), ("Dev", "he", "him"),
  ("Eva", "she", "her"), ("Finn", "he", "him"), ("Gia", "she", "her"), ("Hugo", "he", "him"),
  ("Ivy", "she", "her"), ("Jon", "he", "him"), ("Kim", "she", "her"), ("Leo", "he", "him"),
)
# (singular, plural)
_ITEMS = (
  ("apple", "apples"), ("marble", "marbles"), ("sticker", "stickers"), ("coin", "coins"),
  ("book", "books"), ("card", "cards"), ("pencil", "pencils"), ("shell", "shells"),
  ("stamp", "stamps"), ("cookie", "cookies"), ("toy car", "toy cars"), ("ribbon", "ribbons"),
)
_START = ("{name} has {n} {items}.", "{name} starts with {n} {items}.")
# One sentence per operation. Each operation's sentences carry a word the others lack ("more",
# "away/loses/sells", "times", "equal") so a reader (and a test) can tell them apart.
_SENTENCES = {
  "+": ("{Subj} buys {n} more.", "{Subj} finds {n} more.", "A friend gives {obj} {n} more."),
  "-": ("{Subj} gives away {n}.", "{Subj} loses {n}.", "{Subj} sells {n}."),
  "*": ("{Subj} ends up with {n} times as many as before.",
        "The number of {items} {subj} has becomes {n} times as large."),
  "/": ("{Subj} divides them into {n} equal piles and keeps one pile.",
        "{Subj} splits them equally into {n} bags and keeps one bag."),
}
_QUESTIONS = ("How many {items} does {name} have now?", "How many {items} does {subj} have now?")


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
  """Difficulty of generated problems.

  Attributes:
    min_steps, max_steps: operations per problem, drawn uniformly from [min_steps, max_steps].
    max_operand: the start value and every added or subtracted amount lie in [1, max_operand].
    max_factor: multiplication factors and divisors lie in [2, max_factor].
    max_value: bound on every intermediate result (an operation that would exceed it is not
      drawn).
    operations: the operations drawn from, a subset of ``OPERATIONS``.
  """

  min_steps: int = 2
  max_steps: int = 4
  max_operand: int = 20
  max_factor: int = 5
  max_value: int = 999
  operations: tuple[str, ...] = OPERATIONS

  def __post_init__(self):
    if self.min_steps < 1:
      raise ValueError(f"min_steps={self.min_steps}: expected >= 1 (operations per problem)")
    if self.max_steps < self.min_steps:
      raise ValueError(f"max_steps={self.max_steps}: expected >= min_steps={self.min_steps}")
    if self.max_operand < 1:
      raise ValueError(f"max_operand={self.max_operand}: expected >= 1")
    if self.max_factor < 2:
      raise ValueError(f"max_factor={self.max_factor}: expected >= 2")
    if self.max_value < self.max_operand:
      raise ValueError(f"max_value={self.max_value}: expected >= max_operand={self.max_operand}")
    unknown = [op for op in self.operations if op not in OPERATIONS]
    if unknown or not self.operations:
      raise ValueError(
        f"operations={self.operations!r}: expected a non-empty subset of {OPERATIONS}")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
  """One problem: its story, its reference solution lines (operations only), its answer.

  Attributes:
    question: the word problem.
    solution_steps: one line "a op b = c" per operation, in order (without the answer line).
    answer: the final result.
    num_steps: the number of operations, ``len(solution_steps)``.
    split: ``"train"`` or ``"test"``, always ``split_of(solution_steps)``.

  Construction checks that the steps chain and compute correctly, that ``answer`` is the last
  result and that ``split`` is the computation's split: a problem read from a file holds.
  """

  question: str
  solution_steps: tuple[str, ...]
  answer: int
  num_steps: int
  split: str

  def __post_init__(self):
    object.__setattr__(self, "solution_steps", tuple(self.solution_steps))
    if self.num_steps != len(self.solution_steps) or self.num_steps < 1:
      raise ValueError(
        f"num_steps={self.num_steps}: expected len(solution_steps)={len(self.solution_steps)}"
        " and >= 1")
    _check_split(self.split)
    reference = _parse_reference(self.solution_steps)
    value = reference[0][0]
    for line, (a, op, b, c) in zip(self.solution_steps, reference, strict=True):
      if a != value or _apply(a, op, b) != c:
        raise ValueError(f"solution step {line!r}: expected {value} {op} {b} = "
                         f"{_apply(value, op, b)}")
      value = c
    if self.answer != value:
      raise ValueError(f"answer={self.answer!r}: expected the last step's result {value}")
    if split_of(self.solution_steps) != self.split:
      raise ValueError(
        f"split={self.split!r}: the computation {_computation_key(self.solution_steps)!r} "
        f"belongs to split {split_of(self.solution_steps)!r}")

  @property
  def solution(self) -> str:
    """The reference solution text: the operation lines, then "The answer is N"."""
    return format_solution(self.solution_steps, self.answer)


@dataclasses.dataclass(frozen=True)
class CorruptedSolution:
  """A solution with one wrong step whose error is carried through to a wrong answer.

  Attributes:
    solution_steps: the operation lines; lines before ``wrong_step`` equal the reference's.
    answer: the (wrong) final result the lines lead to.
    wrong_step: index of the operation line whose result is wrong.
  """

  solution_steps: tuple[str, ...]
  answer: int
  wrong_step: int

  @property
  def solution(self) -> str:
    return format_solution(self.solution_steps, self.answer)


# The prompt the arithmetic policy (``qstar_jax.models.load_arithmetic_policy``) reads: the
# question, then "A:" and a newline, after which the solution lines follow.
POLICY_PROMPT_FORMAT = "Q: {question}\nA:\n"


def policy_prompt(question: str, *, prompt_format: str = POLICY_PROMPT_FORMAT) -> str:
  """The policy's prompt text for ``question`` (``prompt_format`` has one ``{question}`` field).

  Examples:
    >>> policy_prompt("Ann has 3 apples. How many apples does she have now?")
    'Q: Ann has 3 apples. How many apples does she have now?\\nA:\\n'
  """
  return prompt_format.format(question=question)


def format_solution(solution_steps: Sequence[str], answer: int) -> str:
  """The operation lines and the answer line, joined by newlines.

  Examples:
    >>> format_solution(["12 + 7 = 19", "19 - 5 = 14"], 14)
    '12 + 7 = 19\\n19 - 5 = 14\\nThe answer is 14'
  """
  return "\n".join([*solution_steps, f"The answer is {answer}"])


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")


def _apply(a: int, op: str, b: int) -> int | None:
  """a op b, or None for a division that is not exact."""
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  return a // b if b != 0 and a % b == 0 else None


def parse_step(line: str) -> tuple[int, str, int, int] | None:
  """``(a, op, b, c)`` of a line "a op b = c" (op one of + - * /), else None.

  Examples:
    >>> parse_step("19 - 5 = 14")
    (19, '-', 5, 14)
    >>> parse_step("The answer is 14") is None
    True
  """
  match = _STEP.match(line)
  if match is None:
    return None
  a, op, b, c = match.groups()
  return int(a), op, int(b), int(c)


def _parse_reference(solution_steps: Sequence[str]) -> list[tuple[int, str, int, int]]:
  parsed = [parse_step(line) for line in solution_steps]
  for line, step in zip(solution_steps, parsed, strict=True):
    if step is None:
      raise ValueError(f"solution step {line!r}: expected 'a op b = c' with op in {OPERATIONS}")
  return parsed


def _key(start: int, operations: Sequence[tuple[str, int]]) -> str:
  """The computation without its story: start value, then each operation and operand."""
  return " ".join([str(start), *(f"{op} {operand}" for op, operand in operations)])


def _computation_key(solution_steps: Sequence[str]) -> str:
  steps = _parse_reference(solution_steps)
  return _key(steps[0][0], [(op, b) for _, op, b, _ in steps])


def _split_of_key(key: str) -> str:
  digest = hashlib.sha256(f"qstar_jax.arithmetic:{key}".encode()).digest()
  bucket = int.from_bytes(digest[:8], "big") % _HASH_BUCKETS
  return "test" if bucket < TEST_FRACTION * _HASH_BUCKETS else "train"


def split_of(solution_steps: Sequence[str]) -> str:
  """The split a computation belongs to: a hash of its start value, operations and operands.

  Independent of the wording, the seed and the difficulty (see the module docstring).
  """
  return _split_of_key(_computation_key(solution_steps))


def _rng(*parts: object) -> random.Random:
  """A random stream determined by ``parts`` alone (sha256, not Python's salted ``hash``)."""
  digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_operation(
  rng: random.Random, value: int, config: ArithmeticConfig
) -> tuple[str, int] | None:
  """(op, operand) for one step from ``value``, uniform over the operations allowed there."""
  choices = {}
  if "+" in config.operations and value < config.max_value:
    choices["+"] = range(1, min(config.max_operand, config.max_value - value) + 1)
  if "-" in config.operations and value >= 2:
    choices["-"] = range(1, min(config.max_operand, value - 1) + 1)
  if "*" in config.operations and value * 2 <= config.max_value:
    choices["*"] = range(2, min(config.max_factor, config.max_value // value) + 1)
  if "/" in config.operations:
    divisors = [d for d in range(2, config.max_factor + 1) if value % d == 0]
    if divisors:
      choices["/"] = divisors
  if not choices:
    return None
  op = rng.choice(sorted(choices))
  return op, rng.choice(choices[op])


def _draw_computation(
  rng: random.Random, config: ArithmeticConfig
) -> tuple[int, list[tuple[str, int]]] | None:
  """(start, [(op, operand), ...]) or None when some step had no allowed operation."""
  num_steps = rng.randint(config.min_steps, config.max_steps)
  start = rng.randint(1, config.max_operand)
  value, operations = start, []
  for _ in range(num_steps):
    drawn = _draw_operation(rng, value, config)
    if drawn is None:
      return None
    operations.append(drawn)
    value = _apply(value, *drawn)
  return start, operations


def _solution_lines(start: int, operations: Sequence[tuple[str, int]]) -> tuple[list[str], int]:
  value, lines = start, []
  for op, operand in operations:
    result = _apply(value, op, operand)
    lines.append(f"{value} {op} {operand} = {result}")
    value = result
  return lines, value


def _story(rng: random.Random, start: int, operations: Sequence[tuple[str, int]]) -> str:
  name, subj, obj = rng.choice(_PEOPLE)
  singular, plural = rng.choice(_ITEMS)
  fields = {"name": name, "subj": subj, "Subj": subj.capitalize(), "obj": obj, "items": plural}
  start_items = singular if start == 1 else plural
  sentences = [rng.choice(_START).format(**{**fields, "items": start_items}, n=start)]
  for i, (op, operand) in enumerate(operations):
    sentence = rng.choice(_SENTENCES[op]).format(**fields, n=operand)
    if i > 0 and rng.random() < 0.5:
      sentence = "Then " + sentence[0].lower() + sentence[1:]
    sentences.append(sentence)
  sentences.append(rng.choice(_QUESTIONS).format(**fields))
  return " ".join(sentences)


def generate_problem(
  seed: int, index: int, *, split: str = "train", config: ArithmeticConfig | None = None
) -> ArithmeticProblem:
  """Problem ``index`` of ``split``: a pure function of ``(seed, split, index, config)``.

  Draws candidate computations from a random stream keyed by those values until one belongs to
  ``split`` (``split_of``), then tells it as a story.

  Raises:
    ValueError: unknown split, negative index, or a config with too few distinct computations
      to find one in ``split``.
  """
  _check_split(split)
  if index < 0:
    raise ValueError(f"index={index}: expected >= 0")
  config = ArithmeticConfig() if config is None else config
  rng = _rng("qstar_jax.arithmetic", seed, split, index)
  for _ in range(_MAX_CANDIDATES):
    drawn = _draw_computation(rng, config)
    if drawn is None:
      continue
    start, operations = drawn
    if _split_of_key(_key(start, operations)) == split:
      lines, answer = _solution_lines(start, operations)
      return ArithmeticProblem(
        question=_story(rng, start, operations), solution_steps=tuple(lines), answer=answer,
        num_steps=len(lines), split=split)
  raise ValueError(
    f"{config}: found no {split!r} problem in {_MAX_CANDIDATES} candidates (seed={seed}, "
    f"index={index}); expected a config with more distinct computations")


def generate_problems(
  seed: int, count: int, *, split: str = "train", config: ArithmeticConfig | None = None,
  start: int = 0,
) -> list[ArithmeticProblem]:
  """Problems ``start .. start + count - 1`` of ``split`` (see ``generate_problem``).

  Problems are drawn independently, so a config with few distinct computations repeats some.
  """
  if count < 0:
    raise ValueError(f"count={count}: expected >= 0")
  return [generate_problem(seed, i, split=split, config=config)
          for i in range(start, start + count)]


def stated_answer_reward(solution_text: str, reference: str) -> float:
  """1.0 when the text states an answer (an answer cue and a number) equal to ``reference``."""
  answer = stated_answer(solution_text)
  return 0.0 if answer is None else float(answers_match(answer, reference))


def arithmetic_reward(solution_text: str, problem: ArithmeticProblem) -> float:
  """The verifier's verdict on a solution text: 1.0 when it states ``problem.answer``, else 0.0.

  Examples:
    >>> p = generate_problem(0, 0)
    >>> arithmetic_reward(p.solution, p), arithmetic_reward("I do not know.", p)
    (1.0, 0.0)
  """
  return stated_answer_reward(solution_text, str(problem.answer))


def gsm8k_reward(solution_text: str, record: Mapping[str, Any]) -> float:
  """Same as ``arithmetic_reward`` for a GSM8K record (``qstar_jax.data.load_gsm8k``): 1.0 when
  the text states ``record["final_answer"]``, else 0.0."""
  return stated_answer_reward(solution_text, record["final_answer"])


def check_steps(solution_text: str, problem: ArithmeticProblem) -> list[bool]:
  """Whether each non-empty line of a solution follows validly from the question and the lines
  before it; one bool per line.

  Line ``i < problem.num_steps`` must be "a op b = c" with ``a`` the previous line's result (the
  problem's start value for the first line), ``op b`` the problem's ``i``-th operation and
  ``c`` computed correctly. Line ``num_steps`` must state the previous line's result as the
  answer ("The answer is N"). Further lines are wrong. Validity is local: a line that computes
  correctly from a wrong previous result counts as valid, so the first False marks the first
  error (the label a process reward model learns). When every line is valid and there are
  ``num_steps + 1`` of them, the stated answer is ``problem.answer``.

  Examples:
    >>> p = generate_problem(0, 0)
    >>> check_steps(p.solution, p) == [True] * (p.num_steps + 1)
    True
  """
  reference = _parse_reference(problem.solution_steps)
  lines = [line.strip() for line in solution_text.split("\n") if line.strip()]
  previous: int | None = reference[0][0]
  verdicts = []
  for i, line in enumerate(lines):
    if i < problem.num_steps:
      step = parse_step(line)
      _, ref_op, ref_operand, _ = reference[i]
      valid = (step is not None and step[0] == previous and step[1:3] == (ref_op, ref_operand)
               and _apply(step[0], step[1], step[2]) == step[3])
      previous = None if step is None else step[3]
    else:
      valid = (i == problem.num_steps and previous is not None and states_answer(line)
               and extract_final_number(line) == str(previous))
    verdicts.append(bool(valid))
  return verdicts


def inject_wrong_step(
  problem: ArithmeticProblem, *, seed: int, step: int | None = None
) -> CorruptedSolution:
  """The reference solution with the result of operation ``step`` made wrong and carried on.

  The wrong result differs from the right one by a nonzero multiple of the product of the
  later divisors, so every later division stays exact; every later line then starts from a
  different value and, as each operation is strictly increasing in its left operand, ends at
  a different value: the lines from ``step`` on all differ from the reference and the final
  answer is wrong. Every later line is computed correctly (``check_steps`` marks only ``step``).
  Deterministic given ``(seed, problem, step)``; ``step=None`` draws it from the seed.

  Raises:
    ValueError: ``step`` outside ``[0, problem.num_steps)``.
  """
  reference = _parse_reference(problem.solution_steps)
  rng = _rng("qstar_jax.arithmetic.corrupt", seed, problem.question, step)
  if step is None:
    step = rng.randrange(problem.num_steps)
  if not 0 <= step < problem.num_steps:
    raise ValueError(f"step={step}: expected an operation index in [0, {problem.num_steps})")
  period = 1
  for _, op, operand, _ in reference[step + 1:]:
    if op == "/":
      period *= operand
  operations = [(op, operand) for _, op, operand, _ in reference[step + 1:]]
  correct = reference[step][3]
  offsets = [m * period for m in (1, 2, 3)]
  # A smaller wrong result is allowed when the whole rest of the chain stays positive.
  offsets += [-d for d in offsets if _chain_stays_positive(correct - d, operations)]
  wrong = correct + rng.choice(offsets)
  a, op, operand, _ = reference[step]
  later, answer = _solution_lines(wrong, operations)
  lines = [*problem.solution_steps[:step], f"{a} {op} {operand} = {wrong}", *later]
  return CorruptedSolution(solution_steps=tuple(lines), answer=answer, wrong_step=step)


def _chain_stays_positive(value: int, operations: Sequence[tuple[str, int]]) -> bool:
  if value < 1:
    return False
  for op, operand in operations:
    value = _apply(value, op, operand)
    if value is None or value < 1:
      return False
  return True


def _to_record(problem: ArithmeticProblem) -> dict[str, Any]:
  record = dataclasses.asdict(problem)
  record["solution_steps"] = list(problem.solution_steps)
  return record


def _from_record(record: Any, where: str) -> ArithmeticProblem:
  fields = [f.name for f in dataclasses.fields(ArithmeticProblem)]
  if not isinstance(record, dict) or sorted(record) != sorted(fields):
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: got {keys}, expected an object with keys {sorted(fields)}")
  try:
    return ArithmeticProblem(**record)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def problems_to_jsonl(problems: Iterable[ArithmeticProblem]) -> str:
  """One JSON object per line (the dataclass fields), each line ending in a newline."""
  return "".join(json.dumps(_to_record(p)) + "\n" for p in problems)


def problems_from_jsonl(text: str, *, source: str = "<text>") -> list[ArithmeticProblem]:
  """Inverse of ``problems_to_jsonl`` (blank lines skipped); errors name ``source:line``."""
  problems = []
  for i, line in enumerate(text.split("\n")):
    if line.strip():
      where = f"{source}:{i + 1}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from e
      problems.append(_from_record(record, where))
  return problems


def write_problems_jsonl(path: str | os.PathLike, problems: Iterable[ArithmeticProblem]) -> None:
  """Writes ``problems_to_jsonl(problems)`` to ``path`` (UTF-8)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(problems_to_jsonl(problems))


def read_problems_jsonl(path: str | os.PathLike) -> list[ArithmeticProblem]:
  """Problems from a file written by ``write_problems_jsonl``."""
  with open(path, encoding="utf-8") as f:
    return problems_from_jsonl(f.read(), source=os.fspath(path))
