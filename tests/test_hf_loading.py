"""Hugging Face checkpoints: logit parity with transformers on tiny random Llama/Qwen2 models.

The fixtures (tests/fixtures/hf_*) and their reference logits were written by
tests/fixtures/make_fixtures.py with torch + transformers 5.x; no torch is needed here.
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.models import load_pretrained
from qstar_jax.models.hf_loader import config_from_hf, read_safetensors
from qstar_jax.models.llama import from_flat_params
from qstar_jax.models.tokenizer import HFTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TOLERANCE = 1e-4  # max |logit difference| in float32

CASES = {
  # name: (architecture, tied, attention_bias, rope_type, has tokenizer, number of shards)
  "hf_llama_tied": ("llama", True, False, None, True, 1),
  "hf_llama3_rope_v4": ("llama", False, False, "llama3", False, 1),
  "hf_qwen2_bias_sharded": ("qwen2", False, True, None, False, 3),
  "hf_qwen2_tied": ("qwen2", True, True, None, False, 1),
}


def _logits(model, tokens) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_logit_parity_with_transformers(name):
  arch, tied, bias, rope_type, has_tokenizer, shards = CASES[name]
  directory = FIXTURES / name
  assert len(list(directory.glob("*.safetensors"))) == shards
  model, tokenizer = load_pretrained(str(directory))
  config = model.config
  assert (config.architecture, config.tie_word_embeddings, config.attention_bias) == (
    arch,
    tied,
    bias,
  )
  assert config.num_kv_heads < config.num_heads  # grouped-query attention
  assert (dict(config.rope_scaling or {}).get("rope_type")) == rope_type
  assert (tokenizer is not None) == has_tokenizer
  ref = np.load(directory / "reference.npz")
  out = _logits(model, ref["tokens"])
  assert out.shape == ref["logits"].shape and out.dtype == np.float32
  err = float(np.abs(out - ref["logits"]).max())
  print(f"{name}: max |dlogit| = {err:.2e}")
  assert err <= TOLERANCE


def test_rope_scaling_matters():
  """The Llama-3 fixture really exercises the scaling: dropping it breaks parity."""
  directory = FIXTURES / "hf_llama3_rope_v4"
  model, _ = load_pretrained(directory)
  ref = np.load(directory / "reference.npz")
  from qstar_jax.models.llama import get_flat_params

  unscaled = from_flat_params(model.config.replace(rope_scaling=None), get_flat_params(model))
  err = float(np.abs(_logits(unscaled, ref["tokens"]) - ref["logits"]).max())
  assert err > 100 * TOLERANCE


def test_v4_and_v5_config_styles_agree():
  v5 = json.loads((FIXTURES / "hf_llama_tied" / "config.json").read_text())
  assert "rope_parameters" in v5 and "dtype" in v5  # written by transformers 5
  v4 = dict(v5)
  v4["rope_theta"] = v4.pop("rope_parameters")["rope_theta"]
  v4["torch_dtype"] = v4.pop("dtype")
  assert config_from_hf(v4) == config_from_hf(v5)

  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
  v5_scaled = dict(v5, rope_parameters={**scaling, "rope_theta": 500000.0}, dtype="bfloat16")
  v4_scaled = {k: v for k, v in v4.items()}
  v4_scaled.update(rope_theta=500000.0, rope_scaling=scaling, torch_dtype="bfloat16")
  a, b = config_from_hf(v5_scaled, dtype=None), config_from_hf(v4_scaled, dtype=None)
  assert a == b
  assert a.rope_theta == 500000.0 and dict(a.rope_scaling)["factor"] == 8.0
  assert a.param_dtype == "bfloat16"  # dtype=None keeps the checkpoint's dtype
  # Old v4 files spell the rope kind "type"; generation_config adds eos ids.
  old = dict(v4_scaled, rope_scaling={**scaling, "type": scaling["rope_type"]})
  del old["rope_scaling"]["rope_type"]
  c = config_from_hf(old, generation_config={"eos_token_id": [2, 7]})
  assert c.rope_scaling == a.rope_scaling and c.eos_token_ids == (2, 7)


def test_bfloat16_load():
  directory = FIXTURES / "hf_qwen2_bias_sharded"
  model, _ = load_pretrained(directory, dtype="bfloat16")
  assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
  ref = np.load(directory / "reference.npz")
  err = float(np.abs(_logits(model, ref["tokens"]) - ref["logits"]).max())
  # bf16 keeps 8 mantissa bits (relative error 2^-9 per value); logits are O(1).
  assert err < 0.1


def test_tied_checkpoint_with_stored_lm_head(tmp_path):
  """Some tied checkpoints still store lm_head.weight: it is ignored, not an error."""
  from safetensors.numpy import save_file

  directory = tmp_path / "tied"
  shutil.copytree(FIXTURES / "hf_qwen2_tied", directory)
  tensors = {k: np.array(v) for k, v in read_safetensors(directory / "model.safetensors").items()}
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  save_file(tensors, str(directory / "model.safetensors"))
  model, tokenizer = load_pretrained(directory)
  assert tokenizer is None and model.lm_head is None
  ref = np.load(directory / "reference.npz")
  assert float(np.abs(_logits(model, ref["tokens"]) - ref["logits"]).max()) <= TOLERANCE


def test_hf_directory_tokenizer():
  directory = FIXTURES / "hf_llama_tied"
  _, tokenizer = load_pretrained(directory)
  assert isinstance(tokenizer, HFTokenizer)
  ref = json.loads((directory / "tokenizer_reference.json").read_text())
  assert tokenizer.bos_id == ref["bos_id"] and tokenizer.eos_ids == (ref["eos_id"],)
  assert tokenizer.vocab_size == ref["vocab_size"]
