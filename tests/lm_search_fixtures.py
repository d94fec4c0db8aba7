"""Shared fixtures of the LM step-search tests: a tiny random Llama whose sampled steps end
within a few tokens, a random linear value head, a StepSpec and prompt builders.

Import the helpers and wrap `tiny_policy()` in a module-scoped fixture:

    @pytest.fixture(scope="module")
    def policy():
      return tiny_policy()

`tiny_policy()` is cached: every test module of a session shares the same arrays.

How steps end fast: every embedding row has a large constant in hidden dimension 0, so after the
final RMS norm that dimension is large and positive for every token; the lm_head rows of
`STOP_ID` and `EOS_ID` read it with a large weight. Random sampling then ends most steps
within 1..4 tokens (MAX_STEP_TOKENS = 4) and about one step in six holds the EOS id (terminal).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.models import SamplingConfig, flat_param_shapes, from_flat_params, get_config
from qstar_jax.search.steps.step_tree import PolicyValueParams, StepSpec

VOCAB = 256
STOP_ID = 10          # ends a step (a "newline")
EOS_ID = 2            # ends the solution: the step is terminal
PAD_ID = 0
MAX_STEP_TOKENS = 4

TINY_SPEC = StepSpec(stop_ids=(STOP_ID,), eos_ids=(EOS_ID,), max_step_tokens=MAX_STEP_TOKENS,
                     pad_id=PAD_ID)
SAMPLING = SamplingConfig(max_new_tokens=1)   # temperature 1 sampling (max_new_tokens ignored)
GREEDY = SamplingConfig(max_new_tokens=1, greedy=True)

_EMBED_CONST = 10.0   # hidden dim 0 of every embedding row
_STOP_WEIGHT = 1.2    # lm_head[0, STOP_ID]
_EOS_WEIGHT = 1.05   # lm_head[0, EOS_ID]


@functools.cache
def tiny_policy(seed: int = 0) -> tuple[nnx.GraphDef, PolicyValueParams]:
  """(graphdef, PolicyValueParams) of a tiny float32 random Llama (vocab 256, D 64, 2 layers,
  max_seq_len 256) with a random linear value head {"kernel" [64, 1], "bias" [1]}."""
  config = get_config("tiny", eos_token_ids=())
  rng = np.random.default_rng(seed)
  flat = {name: np.ones(shape, np.float32) if name.endswith(".scale") else
          rng.normal(0.0, 1.0 if name.startswith("embed") else 0.15, shape).astype(np.float32)
          for name, shape in flat_param_shapes(config).items()}
  flat["embed_tokens.embedding"][:, 0] = _EMBED_CONST
  flat["lm_head.kernel"][0, :] = 0.0
  flat["lm_head.kernel"][0, STOP_ID] = _STOP_WEIGHT
  flat["lm_head.kernel"][0, EOS_ID] = _EOS_WEIGHT
  graphdef, policy = nnx.split(from_flat_params(config, flat))
  value = {"kernel": jnp.asarray(rng.normal(0.0, 0.3, (config.hidden_size, 1)), jnp.float32),
           "bias": jnp.zeros((1,), jnp.float32)}
  return graphdef, PolicyValueParams(policy=policy, value=value)


def make_prompts(lengths, *, width: int | None = None, seed: int = 0):
  """Right-padded random prompts (ids 11..VOCAB-1, never a stop/EOS/pad id).

  Returns (tokens [B, width] int32, lengths [B] int32); width defaults to max(lengths).
  """
  lengths = [int(n) for n in lengths]
  width = max(lengths) if width is None else width
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), width), PAD_ID, np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(STOP_ID + 1, VOCAB, n)
  return jnp.asarray(tokens), jnp.asarray(np.array(lengths, np.int32))
