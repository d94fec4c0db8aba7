"""GGUF loading: a tiny random Llama in F32/F16/Q8_0/Q4_0/Q4_1 against transformers' GGUF loader.

tests/fixtures/gguf_llama_mixed.gguf was written by make_fixtures.py as llama.cpp writes
Llama weights (q/k rows permuted to the interleaved rotary layout); the reference logits come
from transformers loading that same file (its own dequantisation and un-permutation).
"""

import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.models import gguf_loader, load_pretrained

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
GGUF_FILE = FIXTURES / "gguf_llama_mixed.gguf"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
  return np.load(FIXTURES / "gguf_llama_mixed_reference.npz")


def test_fixture_covers_every_supported_tensor_type():
  reader = gguf_loader.open_gguf(GGUF_FILE)
  types = {t.tensor_type.name for t in reader.tensors}
  assert {"F32", "F16", "Q8_0", "Q4_0", "Q4_1"} <= types


def test_logit_parity_with_transformers_gguf(reference):
  model, tokenizer = load_pretrained(GGUF_FILE)
  assert tokenizer is None  # the tiny file carries no tokenizer metadata
  config = model.config
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
    2, 32, 4, 2)  # fmt: skip
  assert not config.tie_word_embeddings  # output.weight is present
  assert config.eos_token_ids == (2,) and config.bos_token_id == 1
  out = np.asarray(model(jnp.asarray(reference["tokens"])))
  err = float(np.abs(out - reference["logits"]).max())
  print(f"GGUF (mixed types) vs transformers: max |dlogit| = {err:.2e}")
  assert err <= TOLERANCE
  # Quantisation really happened: the float32 source model differs noticeably.
  assert float(np.abs(out - reference["unquantized_logits"]).max()) > 10 * TOLERANCE


def test_rotary_unpermutation_is_needed(reference, monkeypatch):
  """Without undoing llama.cpp's q/k permutation the logits are wrong (the test can fail)."""
  monkeypatch.setattr(gguf_loader, "unpermute_rotary", lambda w, num_heads: w)
  model, _ = load_pretrained(GGUF_FILE)
  out = np.asarray(model(jnp.asarray(reference["tokens"])))
  assert float(np.abs(out - reference["logits"]).max()) > 100 * TOLERANCE


def test_unpermute_rotary_by_hand():
  # One head, hd = 4: HF rotate_half pairs rows (0, 2) and (1, 3); llama.cpp stores the pairs
  # adjacent: [r0, r2, r1, r3].
  hf = np.array([[0.0], [1.0], [2.0], [3.0]])
  stored = hf[[0, 2, 1, 3]]
  np.testing.assert_array_equal(gguf_loader.unpermute_rotary(stored, 1), hf)
  # Two heads of hd = 4 (rows 0-3, 4-7) and a bias vector.
  hf2 = np.arange(8.0)
  stored2 = hf2[[0, 2, 1, 3, 4, 6, 5, 7]]
  np.testing.assert_array_equal(gguf_loader.unpermute_rotary(stored2, 2), hf2)


def test_dequantized_tensors_match_gguf_package():
  """Our flat tensors are gguf's dequantisation, mapped and transposed to [in, out]."""
  reader = gguf_loader.open_gguf(GGUF_FILE)
  model, _ = load_pretrained(GGUF_FILE)
  t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
  assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
  expected = gguf.quants.dequantize(t.data, t.tensor_type).T  # [in, out]
  got = np.asarray(model.layers[1].mlp.down_proj.kernel[...])
  np.testing.assert_array_equal(got, expected)
