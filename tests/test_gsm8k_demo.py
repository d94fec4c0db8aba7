"""The step-by-step rollout of the demo equals brute-force greedy decoding without a cache."""

import numpy as np
from flax import nnx

from experiments.gsm8k_demo import greedy_step_rollout
from qstar_jax.models import Llama, get_config


def _brute_force_greedy(model, prompt, num_tokens):
  # Full recompute of the whole sequence per token. The buffer is right-padded to one width so
  # the model compiles once; causal attention makes the padding invisible to earlier positions.
  width = len(prompt) + num_tokens
  forward = nnx.jit(lambda m, x: m(x))
  seq = list(prompt)
  for _ in range(num_tokens):
    buffer = np.zeros((1, width), np.int32)
    buffer[0, :len(seq)] = seq
    logits = np.asarray(forward(model, buffer))
    seq.append(int(np.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_step_rollout_continues_from_cache_like_a_full_recompute():
  config = get_config("tiny")
  model = Llama(config, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model)
  prompt = [1, 17, 42, 99, 5, 23]
  reference = _brute_force_greedy(model, prompt, 24)
  # Pick step delimiters that the greedy continuation actually produces, so steps end early.
  stop_ids = tuple(sorted(set(reference[2:12:3])))
  calls = []
  rollout = greedy_step_rollout(
    graphdef, params, prompt_ids=prompt, step_stop_ids=stop_ids, eos_ids=(),
    max_steps=4, max_step_tokens=6, on_step=lambda i, ids: calls.append(i))
  flat = [t for step in rollout.steps for t in step]
  assert flat == reference[:len(flat)]
  assert len(rollout.steps) == 4 and calls == [0, 1, 2, 3]
  for step in rollout.steps:
    # Each step ends at the first delimiter or at max_step_tokens, never later.
    ends = [i for i, t in enumerate(step) if t in stop_ids]
    assert (ends and ends[0] == len(step) - 1) or (not ends and len(step) == 6)
  assert any(step[-1] in stop_ids for step in rollout.steps)


def test_rollout_stops_at_final_step():
  config = get_config("tiny")
  model = Llama(config, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model)
  rollout = greedy_step_rollout(
    graphdef, params, prompt_ids=[1, 2, 3], step_stop_ids=(), eos_ids=(),
    max_steps=5, max_step_tokens=3, is_final_step=lambda ids: True)
  assert len(rollout.steps) == 1 and rollout.finished
