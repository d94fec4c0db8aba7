"""The step-by-step rollout (qstar_jax.search.steps) equals brute-force greedy decoding without a
cache, split at the step delimiters afterwards."""

import jax
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import ByteTokenizer, Llama, SamplingConfig, get_config
from qstar_jax.search.steps import step_rollout

PROMPTS = ([1, 17, 42, 99, 5, 23], [7, 3, 250])
GREEDY6 = SamplingConfig(max_new_tokens=6, greedy=True)


@pytest.fixture(scope="module")
def model():
  return Llama(get_config("tiny", eos_token_ids=()), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def references(model):
  """Greedy continuations of PROMPTS, 24 tokens each, by full recompute per token. The buffer
  is right-padded to one width so the model compiles once; causal attention makes the padding
  invisible to earlier positions."""
  forward = nnx.jit(lambda m, x: m(x))
  out = []
  for prompt in PROMPTS:
    seq = list(prompt)
    for _ in range(24):
      buffer = np.zeros((1, 32), np.int32)
      buffer[0, :len(seq)] = seq
      seq.append(int(np.argmax(np.asarray(forward(model, buffer))[0, len(seq) - 1])))
    out.append(seq[len(prompt):])
  return out


def split_steps(tokens, stop_ids, max_step_tokens, num_steps):
  """Independent splitting of a flat continuation: a step ends at a delimiter or at its limit."""
  steps, current = [], []
  for t in tokens:
    current.append(t)
    if t in stop_ids or len(current) == max_step_tokens:
      steps.append(tuple(current))
      current = []
    if len(steps) == num_steps:
      break
  return steps


def test_batched_rollout_equals_flat_greedy_split_at_delimiters(model, references):
  graphdef, params = nnx.split(model)
  # Delimiters that the greedy continuations actually produce, so steps end early.
  stop_ids = tuple(sorted(set(references[0][2:12:3]) | {references[1][1]}))
  calls = []
  rollout = step_rollout(graphdef, params, jax.random.key(0), prompts=PROMPTS, sampling=GREEDY6,
                         max_steps=4, step_stop_ids=stop_ids, tokenizer=ByteTokenizer(),
                         on_step=lambda i, b, ids: calls.append((i, b)))
  for b in range(2):
    assert list(rollout.steps[b]) == split_steps(references[b], stop_ids, 6, 4), b
    assert rollout.tokens_decoded[b] == sum(len(s) for s in rollout.steps[b])
    assert rollout.texts[b] == tuple(ByteTokenizer().decode(s) for s in rollout.steps[b])
  assert any(s[-1] in stop_ids and len(s) < 6 for row in rollout.steps for s in row)
  assert rollout.finished == (False, False) and rollout.decode_calls == 4
  assert calls == [(i, b) for i in range(4) for b in range(2)]
  # Both problems run every round: each round costs its longest step in forward passes.
  assert rollout.model_calls == sum(max(len(rollout.steps[0][i]), len(rollout.steps[1][i]))
                                    for i in range(4))
  assert rollout.call_tokens == tuple(len(rollout.steps[0][i]) + len(rollout.steps[1][i])
                                      for i in range(4))


def test_problems_end_at_final_step_or_eos_independently(model, references):
  graphdef, params = nnx.split(model)
  eos = references[0][4]
  first1 = tuple(references[1][:3])
  rollout = step_rollout(graphdef, params, jax.random.key(0), prompts=PROMPTS,
                         sampling=SamplingConfig(max_new_tokens=3, greedy=True), max_steps=5,
                         step_stop_ids=(), eos_ids=(eos,),
                         is_final_step=lambda ids: ids == first1)
  # Problem 1 ends after its first step; problem 0 runs on, unaffected, until its EOS token.
  assert rollout.steps[1] == (first1,) and rollout.finished == (True, True)
  flat0 = [t for s in rollout.steps[0] for t in s]
  assert flat0 == references[0][:references[0].index(eos) + 1]
  assert rollout.texts is None


def test_rollout_errors_name_values(model):
  graphdef, params = nnx.split(model)
  with pytest.raises(ValueError, match="num_candidates=2"):
    step_rollout(graphdef, params, jax.random.key(0), prompts=PROMPTS, max_steps=2,
                 sampling=SamplingConfig(max_new_tokens=3, num_candidates=2), step_stop_ids=())
  with pytest.raises(ValueError, match=r"lengths \[3, 0\]"):
    step_rollout(graphdef, params, jax.random.key(0), prompts=[[1, 2, 3], []], max_steps=2,
                 sampling=GREEDY6, step_stop_ids=())
