import pytest

from qstar_jax.data.gsm8k import load_gsm8k
from qstar_jax.envs.grading import answers_match, extract_final_number, normalize_number


@pytest.mark.parametrize(
  "text, expected",
  [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("So the total is 5 + 6 = 11.\nThe answer is 11.", "11"),
    ("The answer is: $1,250.00", "1250"),
    ("First 3 then 4, so \\boxed{-2.5} and later 9", "-2.5"),
    ("He has 3 apples and buys 4 more, 7 apples.", "7"),
    ("The answer is 4. Wait, the answer is 5.", "5"),
    ("The answer is 1440 / 184 = 1.25.\nNext: 7", "1.25"),
    ("The answer is 12 dollars.", "12"),
    ("no numbers here", None),
  ],
)
def test_extract_final_number(text, expected):
  assert extract_final_number(text) == expected


def test_normalize_number():
  assert normalize_number("18.000") == "18"
  assert normalize_number("1e2") == "100"
  assert normalize_number("0.50") == "0.5"
  assert normalize_number("nan") is None
  assert normalize_number("abc") is None


def test_answers_match():
  assert answers_match("The answer is 18.", "18")
  assert answers_match("18.0", "18")
  assert not answers_match("The answer is 17.", "18")
  assert not answers_match(None, "18")
  with pytest.raises(ValueError, match="'x'"):
    answers_match("3", "x")


def test_every_gsm8k_reference_solution_grades_correct():
  # The worked solutions end in "#### N": grading each against its own final answer must pass,
  # and against a wrong answer must fail (all 1,319 test problems).
  records = load_gsm8k("test")
  assert len(records) == 1319
  for r in records:
    assert answers_match(r["answer"], r["final_answer"]), r["answer"][-80:]
    wrong = str(int(float(r["final_answer"])) + 1)
    assert not answers_match(r["answer"], wrong)
