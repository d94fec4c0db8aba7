"""The multi-step arithmetic task: generator, splits, rewards, step checks, wrong-step injection.

Pure Python, no jit. Solutions are checked against an independent evaluation (the operator
module on Fractions, lines split by hand), and each story sentence against its operation.
"""

from __future__ import annotations

import decimal
import fractions
import hashlib
import operator
import re

import pytest

from qstar_jax.data.gsm8k import load_gsm8k, parse_gsm8k_answer
from qstar_jax.envs import arithmetic as task

CONFIGS = {
  "default": task.ArithmeticConfig(),
  "add_sub_small": task.ArithmeticConfig(min_steps=1, max_steps=2, max_operand=9, max_value=99,
                                         operations=("+", "-")),
  "long_large": task.ArithmeticConfig(min_steps=5, max_steps=5, max_operand=99, max_factor=9,
                                      max_value=9999),
  "mul_div": task.ArithmeticConfig(min_steps=2, max_steps=3, max_operand=12, max_factor=4,
                                   max_value=500, operations=("*", "/")),
}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
# A word each operation's sentence carries and no other operation's sentence does.
_SENTENCE_WORDS = {"+": ("more",), "-": ("gives away", "loses", "sells"), "*": ("times",),
                   "/": ("equal",)}


def _evaluate(line: str) -> tuple[int, str, int, fractions.Fraction, int]:
  """(a, op, b, the exact value of a op b, the stated result) of 'a op b = c'."""
  left, stated = line.split(" = ")
  a, op, b = left.split(" ")
  return int(a), op, int(b), _OPS[op](fractions.Fraction(a), fractions.Fraction(b)), int(stated)


def _sentences(question: str) -> list[str]:
  return re.split(r"(?<=[.?]) ", question)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generated_solutions_are_correct_and_match_their_story(name):
  config = CONFIGS[name]
  for split, count in (("train", 1000), ("test", 200)):
    for problem in task.generate_problems(7, count, split=split, config=config):
      assert problem.split == split
      assert config.min_steps <= problem.num_steps == len(problem.solution_steps)
      assert problem.num_steps <= config.max_steps
      value = None
      operands = []
      sentences = _sentences(problem.question)
      assert len(sentences) == problem.num_steps + 2 and sentences[-1].startswith("How many")
      for line, sentence in zip(problem.solution_steps, sentences[1:-1], strict=True):
        a, op, b, exact, stated = _evaluate(line)
        assert op in config.operations
        assert exact == stated and 1 <= stated <= config.max_value, line
        assert value is None or a == value, (problem.solution_steps, line)
        if op in "+-":
          assert 1 <= b <= config.max_operand
        else:
          assert 2 <= b <= config.max_factor
        assert any(w in sentence for w in _SENTENCE_WORDS[op]), (sentence, op)
        others = [w for o, words in _SENTENCE_WORDS.items() if o != op for w in words]
        assert not any(w in sentence for w in others), (sentence, op)
        value = stated
        operands.append(b)
      start = _evaluate(problem.solution_steps[0])[0]
      assert 1 <= start <= config.max_operand
      # The story states the start value, then each operand in order, and no other number.
      assert [int(n) for n in re.findall(r"\d+", problem.question)] == [start, *operands]
      assert value == problem.answer
      assert problem.solution.split("\n")[-1] == f"The answer is {problem.answer}"
      assert task.check_steps(problem.solution, problem) == [True] * (problem.num_steps + 1)
      assert task.arithmetic_reward(problem.solution, problem) == 1.0


def test_the_generator_is_a_pure_function_of_seed_split_and_index():
  problems = task.generate_problems(0, 200)
  assert problems == task.generate_problems(0, 200)
  assert problems[57] == task.generate_problem(0, 57)
  assert task.generate_problems(0, 10, start=50) == problems[50:60]
  test_problems = task.generate_problems(0, 50, split="test")
  assert test_problems == task.generate_problems(0, 50, split="test")
  other_seed = task.generate_problems(1, 200)
  assert sum(p == q for p, q in zip(problems, other_seed, strict=True)) < 5
  assert problems != task.generate_problems(0, 200, config=CONFIGS["long_large"])
  # Pinned: the stream must not change across Python processes, versions or refactors.
  first = task.generate_problem(0, 0)
  assert first.question == ("Kim starts with 3 cookies. She sells 2. She buys 11 more. "
                            "Then she gives away 11. How many cookies does Kim have now?")
  assert first.solution == "3 - 2 = 1\n1 + 11 = 12\n12 - 11 = 1\nThe answer is 1"
  pinned = {"train": "4771d8adeb819cc912f5b157336cebba20e1e3cdb4ee0d553418ce6ba31df667",
            "test": "c723e7a5a817d8042c48c261d76c84511229ebb7cf22e90724901dce7fb7bb41"}
  for split, digest in pinned.items():
    text = task.problems_to_jsonl(task.generate_problems(0, 100, split=split))
    assert hashlib.sha256(text.encode()).hexdigest() == digest, split


def _computation(problem: task.ArithmeticProblem) -> tuple:
  steps = [_evaluate(line) for line in problem.solution_steps]
  return (steps[0][0], *((op, b) for _, op, b, _, _ in steps))


def test_train_and_test_never_overlap_across_seeds_and_configs():
  train = (task.generate_problems(0, 2500)
           + task.generate_problems(1, 1000, config=CONFIGS["add_sub_small"]))
  test = (task.generate_problems(0, 800, split="test")
          + task.generate_problems(2, 400, split="test", config=CONFIGS["add_sub_small"]))
  assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
  assert not {p.question for p in train} & {p.question for p in test}
  # Not even the same computation told with another name or object.
  train_computations = {_computation(p) for p in train}
  test_computations = {_computation(p) for p in test}
  assert not train_computations & test_computations
  # The small config's space is small enough that both splits repeat computations: the
  # disjointness above is not luck of sparse sampling.
  small_test = test[800:]
  assert len({_computation(p) for p in small_test}) < len(small_test)
  assert all(task.split_of(p.solution_steps) == p.split for p in train + test)


def _hand_problem() -> task.ArithmeticProblem:
  steps = ("12 + 7 = 19", "19 - 5 = 14")
  return task.ArithmeticProblem(
    question="Ann has 12 apples. She buys 7 more. Then she gives away 5. "
             "How many apples does she have now?",
    solution_steps=steps, answer=14, num_steps=2, split=task.split_of(steps))


@pytest.mark.parametrize("text, expected", [
  ("12 + 7 = 19\n19 - 5 = 14\nThe answer is 14", [True, True, True]),
  ("12 + 7 = 19\n\n19 - 5 = 14\nThe answer is 14.\n", [True, True, True]),
  ("12 + 7 = 20\n20 - 5 = 15\nThe answer is 15", [False, True, True]),
  ("12 + 7 = 19\n19 - 5 = 13\nThe answer is 13", [True, False, True]),
  ("12 + 7 = 19\n19 - 5 = 14\nThe answer is 13", [True, True, False]),
  ("12 + 7 = 19\n19 + 5 = 24\nThe answer is 24", [True, False, True]),  # wrong operation
  ("12 + 7 = 19\n18 - 5 = 13\nThe answer is 13", [True, False, True]),  # wrong carry
  ("7 + 12 = 19\n19 - 5 = 14\nThe answer is 14", [False, True, True]),  # not the story's order
  ("12 + 7 = 19\nThe answer is 19", [True, False]),  # answers before the last operation
  ("12 + 7 = 19\n19 - 5 = 14\nSo she has 14", [True, True, False]),  # no answer cue
  ("12 + 7 = 19\n19 - 5 = 14\nThe answer is 14\nThe answer is 14", [True, True, True, False]),
  ("", []),
])
def test_check_steps_by_hand(text, expected):
  assert task.check_steps(text, _hand_problem()) == expected


def test_check_steps_division_must_be_exact():
  steps = ("9 / 3 = 3", "3 * 4 = 12")
  problem = task.ArithmeticProblem("q", steps, 12, 2, task.split_of(steps))
  assert task.check_steps("9 / 3 = 3\n3 * 4 = 12\nThe answer is 12", problem) == [True] * 3
  assert task.check_steps("9 / 3 = 3.0\n3 * 4 = 12", problem) == [False, False]
  assert task.check_steps("9 / 3 = 4\n4 * 4 = 16\nThe answer is 16", problem) == [False, True, True]


def test_rewards():
  problem = _hand_problem()
  assert task.arithmetic_reward(problem.solution, problem) == 1.0
  assert task.arithmetic_reward("12 + 7 = 19\n19 - 5 = 14\nThe answer is 14.", problem) == 1.0
  assert task.arithmetic_reward("#### 14", problem) == 1.0
  assert task.arithmetic_reward("12 + 7 = 19\n19 - 5 = 14\nThe answer is 15", problem) == 0.0
  # No stated answer: nothing parsable, or an unfinished solution whose last line holds 14.
  for text in ("", "I do not know.", "The answer is", "12 + 7 = 19\n19 - 5 = 14"):
    assert task.arithmetic_reward(text, problem) == 0.0, text
  corrupted = task.inject_wrong_step(problem, seed=0)
  assert task.arithmetic_reward(corrupted.solution, problem) == 0.0

  answer = "She makes 3 * 4 = <<3*4=12>>12 cups.\nShe sells 12 - 2 = <<12-2=10>>10.\n#### 10"
  steps, final = parse_gsm8k_answer(answer)
  record = {"question": "q", "answer": answer, "solution_steps": steps, "final_answer": final}
  assert task.gsm8k_reward(answer, record) == 1.0
  assert task.gsm8k_reward("So the answer is $10.00.", record) == 1.0
  assert task.gsm8k_reward("The answer is 12", record) == 0.0
  assert task.gsm8k_reward("She sells 10.", record) == 0.0


def test_gsm8k_reward_on_the_test_split():
  records = load_gsm8k("test")
  assert all(task.gsm8k_reward(r["answer"], r) == 1.0 for r in records)
  wrong = [r["answer"].rpartition("####")[0] + f"#### {decimal.Decimal(r['final_answer']) + 1}"
           for r in records]
  assert not any(task.gsm8k_reward(w, r) for w, r in zip(wrong, records, strict=True))


def test_injected_wrong_steps_change_exactly_the_chosen_step_onwards():
  problems = (task.generate_problems(3, 150)
              + task.generate_problems(3, 50, config=CONFIGS["mul_div"]))
  for problem in problems:
    reference = [*problem.solution_steps, f"The answer is {problem.answer}"]
    for step in range(problem.num_steps):
      corrupted = task.inject_wrong_step(problem, seed=5, step=step)
      assert corrupted == task.inject_wrong_step(problem, seed=5, step=step)
      assert corrupted.wrong_step == step
      lines = corrupted.solution.split("\n")
      assert len(lines) == len(reference)
      assert lines[:step] == reference[:step]
      assert all(x != y for x, y in zip(lines[step:], reference[step:], strict=True)), lines
      assert corrupted.answer != problem.answer
      assert lines[-1] == f"The answer is {corrupted.answer}"
      # Every other line still computes correctly (and positively) from the one before.
      for i, line in enumerate(lines[:-1]):
        _, _, _, exact, stated = _evaluate(line)
        assert (exact == stated) == (i != step) and stated >= 1, lines
      expected = [i != step for i in range(problem.num_steps)] + [True]
      assert task.check_steps(corrupted.solution, problem) == expected
      assert task.arithmetic_reward(corrupted.solution, problem) == 0.0


def test_injected_wrong_steps_are_seeded():
  problem = task.generate_problem(0, 3, config=CONFIGS["long_large"])
  by_seed = [task.inject_wrong_step(problem, seed=s) for s in range(40)]
  assert by_seed == [task.inject_wrong_step(problem, seed=s) for s in range(40)]
  assert {c.wrong_step for c in by_seed} == set(range(problem.num_steps))
  at_step_2 = {task.inject_wrong_step(problem, seed=s, step=2).solution for s in range(40)}
  assert len(at_step_2) > 1


def test_jsonl_round_trip(tmp_path):
  problems = task.generate_problems(0, 20) + task.generate_problems(0, 5, split="test")
  path = tmp_path / "problems.jsonl"
  task.write_problems_jsonl(path, problems)
  assert task.read_problems_jsonl(path) == problems
  text = path.read_text(encoding="utf-8")
  assert text.count("\n") == len(problems)
  assert task.problems_to_jsonl(task.problems_from_jsonl(text)) == text
  assert task.problems_from_jsonl("\n" + text + "\n\n") == problems


def test_jsonl_errors_name_the_line():
  good = task.problems_to_jsonl([_hand_problem()])
  with pytest.raises(ValueError, match=r"<text>:2: not JSON"):
    task.problems_from_jsonl(good + "{oops\n")
  with pytest.raises(ValueError, match=r"f.jsonl:1: got \['answer', 'question'\], expected"):
    task.problems_from_jsonl('{"question": "q", "answer": 3}', source="f.jsonl")
  with pytest.raises(ValueError, match=r"<text>:1: answer=15: expected the last step's result 14"):
    task.problems_from_jsonl(good.replace('"answer": 14', '"answer": 15'))
  split = _hand_problem().split
  other = {"train": "test", "test": "train"}[split]
  with pytest.raises(ValueError, match=rf"split='{other}': the computation '12 \+ 7 - 5' belongs"):
    task.problems_from_jsonl(good.replace(f'"split": "{split}"', f'"split": "{other}"'))


@pytest.mark.parametrize("kwargs, message", [
  ({"min_steps": 0}, r"min_steps=0: expected >= 1"),
  ({"min_steps": 3, "max_steps": 2}, r"max_steps=2: expected >= min_steps=3"),
  ({"max_operand": -4}, r"max_operand=-4: expected >= 1"),
  ({"max_factor": 1}, r"max_factor=1: expected >= 2"),
  ({"max_operand": 50, "max_value": 20}, r"max_value=20: expected >= max_operand=50"),
  ({"operations": ("+", "^")}, r"operations=\('\+', '\^'\): expected a non-empty subset"),
  ({"operations": ()}, r"operations=\(\): expected a non-empty subset"),
])
def test_bad_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    task.ArithmeticConfig(**kwargs)


def test_bad_arguments():
  problem = _hand_problem()
  with pytest.raises(ValueError, match=r"split 'valid': expected one of \('train', 'test'\)"):
    task.generate_problem(0, 0, split="valid")
  with pytest.raises(ValueError, match=r"index=-1: expected >= 0"):
    task.generate_problem(0, -1)
  with pytest.raises(ValueError, match=r"count=-2: expected >= 0"):
    task.generate_problems(0, -2)
  with pytest.raises(ValueError, match=r"step=2: expected an operation index in \[0, 2\)"):
    task.inject_wrong_step(problem, seed=0, step=2)
  with pytest.raises(ValueError, match=r"num_steps=3: expected len\(solution_steps\)=2"):
    task.ArithmeticProblem("q", problem.solution_steps, 14, 3, problem.split)
  with pytest.raises(ValueError, match=r"solution step '19 - 5 = 13': expected 19 - 5 = 14"):
    task.ArithmeticProblem("q", ("12 + 7 = 19", "19 - 5 = 13"), 13, 2, problem.split)
  with pytest.raises(ValueError, match=r"solution step 'twelve': expected 'a op b = c'"):
    task.ArithmeticProblem("q", ("twelve",), 12, 1, "train")
  # A config with a single computation ("1 + 1") fills only the split that computation is in.
  tiny = task.ArithmeticConfig(min_steps=1, max_steps=1, max_operand=1, operations=("+",))
  home = task.split_of(["1 + 1 = 2"])
  assert task.generate_problem(0, 0, split=home, config=tiny).solution_steps == ("1 + 1 = 2",)
  away = {"train": "test", "test": "train"}[home]
  with pytest.raises(ValueError, match=rf"found no '{away}' problem in 2000 candidates"):
    task.generate_problem(0, 0, split=away, config=tiny)
