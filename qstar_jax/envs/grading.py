"""Answer grading for verifiable arithmetic tasks (GSM8K-style final numbers).

A model's answer is the number it states last after an answer cue ("The answer is 18",
"#### 18", "\\boxed{18}") or, without any cue, the last number in its text. Two answers match
when they are equal as exact decimals (so "18", "18.0", "18.00" and "$18" all match "18").
"""

from __future__ import annotations

import decimal
import re

__all__ = ["extract_final_number", "normalize_number", "answers_match", "stated_answer",
           "states_answer"]

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_CUES = (
  re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
  re.compile(r"####\s*(" + _NUMBER + r")"),
  # "The answer is 1440 / 184 = 1.25": the statement runs to the end of its line, and its
  # last number is the one stated.
  re.compile(r"answer\s*(?:is|:|=)\s*(?:\*\*)?\s*(" + _NUMBER + r"[^\n]*)", re.IGNORECASE),
)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
  """Canonical decimal string of a number written with $, commas or trailing zeros, else None.

  Examples:
    >>> normalize_number("$1,200.50")
    '1200.5'
    >>> normalize_number("18.00")
    '18'
    >>> normalize_number("eighteen") is None
    True
  """
  cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
  try:
    value = decimal.Decimal(cleaned)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  value = value.normalize()
  # Decimal("1E+2") -> "100", not "1E+2".
  return format(value, "f") if value == value.to_integral() else str(value)


def extract_final_number(text: str) -> str | None:
  """The answer a solution text states, normalized; None when it states no number.

  The last match of the strongest cue wins (boxed, then "####", then "answer is"); without a
  cue, the last number in the text.

  Examples:
    >>> extract_final_number("3 + 4 = 7 apples.\\nThe answer is 7.")
    '7'
    >>> extract_final_number("She pays $1,000 in total")
    '1000'
  """
  for cue in _CUES:
    matches = cue.findall(text)
    if matches:
      return normalize_number(_ANY_NUMBER.findall(matches[-1])[-1])
  numbers = _ANY_NUMBER.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def states_answer(text: str) -> bool:
  """True when `text` contains an answer cue followed by a number ("The answer is 7", "#### 7").

  Examples:
    >>> states_answer("so 3 + 4 = 7"), states_answer("The answer is 7.")
    (False, True)
  """
  return any(cue.search(text) for cue in _CUES)


def stated_answer(text: str) -> str | None:
  """The number `text` states as its answer ("The answer is N", "#### N", ...), else None: a text
  that never states an answer has none, even when it ends with a number."""
  return extract_final_number(text) if states_answer(text) else None


def answers_match(predicted: str | None, reference: str) -> bool:
  """True when `predicted` (a model's text or extracted number) states `reference`'s number."""
  if predicted is None:
    return False
  ref = normalize_number(reference)
  if ref is None:
    raise ValueError(f"reference answer {reference!r} is not a number")
  pred = normalize_number(predicted)
  if pred is None:
    pred = extract_final_number(predicted)
  return pred == ref
