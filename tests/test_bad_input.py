"""Bad input fails early with a specific error that names the offending value.

Each case: the exception type from qstar_jax.models.errors, a message naming the value, a
traceback that ends in our own checks (not deep inside JAX/Flax), and no partial load.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qstar_jax.models import load_pretrained
from qstar_jax.models.errors import (
  CheckpointError,
  CorruptFileError,
  PromptError,
  QstarError,
  ShapeMismatchError,
  TokenizerMismatchError,
  UnknownArchitectureError,
)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def _raised_in_our_code(excinfo) -> None:
  """The error is ours and was raised by qstar_jax, not by jax/flax internals."""
  assert isinstance(excinfo.value, QstarError)
  last = excinfo.traceback[-1]
  assert "qstar_jax" in str(last.path), f"raised in {last.path}"
  for entry in excinfo.traceback:
    assert "site-packages/jax" not in str(entry.path)
    assert "site-packages/flax" not in str(entry.path)


def _copy(name: str, tmp_path: pathlib.Path) -> pathlib.Path:
  target = tmp_path / name
  shutil.copytree(FIXTURES / name, target)
  return target


def _edit_config(directory: pathlib.Path, **changes) -> None:
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


def test_corrupted_safetensors_header(tmp_path):
  directory = _copy("hf_qwen2_tied", tmp_path)
  file = directory / "model.safetensors"
  data = bytearray(file.read_bytes())
  data[8:40] = b"\xff\xfe{not json at all" + b"#" * 14  # garble the JSON header
  file.write_bytes(bytes(data))
  with pytest.raises(CorruptFileError, match=r"model\.safetensors.*not valid JSON") as excinfo:
    load_pretrained(directory)
  _raised_in_our_code(excinfo)

  # A header length larger than the file (e.g. a truncated download) is caught as well.
  data[:8] = (10**9).to_bytes(8, "little")
  file.write_bytes(bytes(data))
  with pytest.raises(CorruptFileError, match=r"header length 1000000000 bytes"):
    load_pretrained(directory)


def test_truncated_gguf(tmp_path):
  data = (FIXTURES / "gguf_llama_mixed.gguf").read_bytes()
  for keep in (len(data) // 2, len(data) - 100, 200):
    truncated = tmp_path / f"truncated_{keep}.gguf"
    truncated.write_bytes(data[:keep])
    with pytest.raises(CorruptFileError, match=rf"truncated_{keep}\.gguf.*truncated") as excinfo:
      load_pretrained(truncated)
    _raised_in_our_code(excinfo)


def test_tensor_shape_mismatch(tmp_path):
  directory = _copy("hf_llama_tied", tmp_path)
  _edit_config(directory, intermediate_size=48)  # the tensors were saved with 64
  with pytest.raises(
    ShapeMismatchError,
    match=r"model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight has shape \((64, 32|32, 64)\), "
    r"config\.json expects \((48, 32|32, 48)\)",
  ) as excinfo:
    load_pretrained(directory)
  _raised_in_our_code(excinfo)

  # No partial load: assigning a parameter set with one wrong tensor changes nothing.
  from qstar_jax.models.llama import get_flat_params, set_flat_params

  model, _ = load_pretrained(FIXTURES / "hf_llama_tied")
  before = get_flat_params(model)
  bad = {k: np.zeros_like(v) for k, v in before.items()}
  bad["layers.1.mlp.down_proj.kernel"] = np.zeros((63, 32), np.float32)
  with pytest.raises(ShapeMismatchError, match=r"layers\.1\.mlp\.down_proj\.kernel.*\(63, 32\)"):
    set_flat_params(model, bad)
  after = get_flat_params(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_unknown_architecture(tmp_path):
  directory = _copy("hf_qwen2_tied", tmp_path)
  _edit_config(directory, model_type="mamba", architectures=["MambaForCausalLM"])
  with pytest.raises(UnknownArchitectureError, match=r"model_type='mamba'") as excinfo:
    load_pretrained(directory)
  _raised_in_our_code(excinfo)
  assert isinstance(excinfo.value, CheckpointError)

  # A GGUF of another architecture: the metadata value is named as well.
  from qstar_jax.models.gguf_loader import config_from_gguf

  with pytest.raises(UnknownArchitectureError, match=r"general\.architecture='falcon'"):
    config_from_gguf({"general.architecture": "falcon"}, {})


def test_tokenizer_model_vocabulary_mismatch(tmp_path):
  directory = _copy("hf_llama_tied", tmp_path)
  path = directory / "tokenizer.json"
  tok = json.loads(path.read_text())
  for i in range(4):  # ids 128..131: beyond the model's 128-row embedding
    tok["added_tokens"].append(
      {"id": 128 + i, "content": f"<extra_{i}>", "single_word": False, "lstrip": False,
       "rstrip": False, "normalized": False, "special": True}  # fmt: skip
    )
  path.write_text(json.dumps(tok))
  with pytest.raises(TokenizerMismatchError, match=r"vocab_size 132.*vocab_size 128") as excinfo:
    load_pretrained(directory)
  _raised_in_our_code(excinfo)


@pytest.fixture(scope="module")
def tiny_model():
  model, _ = load_pretrained(FIXTURES / "hf_llama_tied")
  graphdef, params = nnx.split(model)
  return model.config, graphdef, params


def test_empty_prompt(tiny_model):
  from qstar_jax.models.decoding import decode

  config, graphdef, params = tiny_model
  with pytest.raises(PromptError, match=r"empty prompt.*\(1, 0\)") as excinfo:
    decode(graphdef, params, jax.random.key(0), tokens=np.zeros((1, 0), np.int32),
           max_new_tokens=4, greedy=True)  # fmt: skip
  _raised_in_our_code(excinfo)
  # A batch where one row is empty.
  with pytest.raises(PromptError, match=r"row 1 has length 0"):
    decode(graphdef, params, jax.random.key(0), tokens=np.ones((2, 3), np.int32),
           lengths=np.array([3, 0]), max_new_tokens=4, greedy=True)  # fmt: skip


def test_prompt_longer_than_context(tiny_model):
  from qstar_jax.models.decoding import decode

  config, graphdef, params = tiny_model
  assert config.max_position_embeddings == 64
  with pytest.raises(PromptError, match=r"65 tokens.*context of 64") as excinfo:
    decode(graphdef, params, jax.random.key(0), tokens=np.ones((1, 65), np.int32),
           max_new_tokens=1, greedy=True)  # fmt: skip
  _raised_in_our_code(excinfo)
  # Fits alone, but not with the requested new tokens.
  with pytest.raises(PromptError, match=r"60 tokens \+ max_new_tokens=8 = 68"):
    decode(graphdef, params, jax.random.key(0), tokens=np.ones((1, 60), np.int32),
           max_new_tokens=8, greedy=True)  # fmt: skip
