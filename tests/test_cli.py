"""CLI: generate --json and bench decode on a random `preset:tiny` model; input errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qstar_jax import cli
from qstar_jax.benchmarks import gemm_floor_step_s
from qstar_jax.models import ByteTokenizer, apply, get_config, init_llama


def test_generate_json_matches_brute_force_greedy(capsys):
  assert cli.main(["generate", "--model", "preset:tiny", "--prompt", "abc",
                   "--max-new-tokens", "6", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["prompt_ids"] == [97, 98, 99]
  assert len(out["token_ids"]) == 6
  # Independent check: greedy continuation recomputed from scratch with the same weights.
  model = init_llama(get_config("tiny"), seed=0)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, t: apply(graphdef, p, t)[0])
  seq = list(out["prompt_ids"])
  for _ in range(6):
    buf = np.zeros((1, 16), np.int32)  # right padding does not change causal logits
    buf[0, :len(seq)] = seq
    logits = forward(params, jnp.asarray(buf))
    seq.append(int(np.argmax(np.asarray(logits[0, len(seq) - 1]))))
  assert seq[3:] == out["token_ids"]
  assert out["text"] == ByteTokenizer().decode(out["token_ids"])


@pytest.mark.parametrize("prompt,message", [
    ("", "empty prompt: '' encodes to no tokens"),
    ("x" * 300, "prompt of 300 tokens .*longer than the model context of 256"),
])
def test_generate_prompt_errors(capsys, prompt, message):
  assert cli.main(["generate", "--model", "preset:tiny", "--prompt", prompt]) == 2
  err = capsys.readouterr().err
  assert re.search(message, err), err
  assert "Traceback" not in err


def test_bench_decode_json(capsys):
  assert cli.main(["bench", "decode", "--model", "preset:tiny", "--batch", "2",
                   "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  for key in ("tokens_per_s", "prefill_s", "compile_s", "weight_bytes_per_s"):
    assert out[key] > 0, key
  assert out["param_bytes"] == 4 * get_config("tiny").num_params()
  np.testing.assert_allclose(out["tokens_per_s"], 2 * 6 / out["seconds"], rtol=1e-9)


def test_bad_arguments_exit_cleanly(capsys):
  assert cli.main(["bench", "decode", "--model", "preset:tiny", "--batch", "0"]) == 2
  assert "--batch=0" in capsys.readouterr().err
  assert cli.main(["generate", "--model", "/nonexistent/model", "--prompt", "a"]) == 2
  assert "/nonexistent/model" in capsys.readouterr().err


def test_gemm_floor_counts_every_weight_matmul_once():
  """The GEMM floor of bench_decode does 2 * B FLOPs per matmul weight: exactly the model's
  parameters minus the RMSNorm gains and, when the LM head is untied, the embedding table."""
  config = get_config("tiny")
  model = init_llama(config, seed=0)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  norm_params = (2 * config.num_layers + 1) * config.hidden_size
  embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
  assert not config.attention_bias
  floor = gemm_floor_step_s(config, batch=3, repeats=1)
  assert floor["gflop"] * 1e9 == pytest.approx(2 * 3 * (n_params - norm_params - embedding),
                                               rel=1e-12)
  assert floor["tokens_per_s_bound"] == pytest.approx(3 / floor["seconds"])
