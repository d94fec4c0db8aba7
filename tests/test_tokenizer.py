"""Tokenizers: SentencePiece training round trips, HF tokenizer.json, GGUF byte-level BPE."""

import json
import pathlib

import pytest

from qstar_jax.data import load_tiny_shakespeare
from qstar_jax.models.tokenizer import (
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  render_chat_template,
  train_sentencepiece,
)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

ODD_STRINGS = [
  "",
  " ",
  "  two  spaces ",
  "trailing   ",
  "\n\nnewlines\n",
  "\ttab\tand\r\ncrlf",
  "émoji 😀 ünïcode 中文 ÅÄÖ",
  "ＡＢＣ fullwidth (NFKC would fold it)",
  "x" * 300,
  "digits 0123456789 and 3.14159",
  "\x00 control \x07 chars",
]


def _shakespeare() -> str:
  return load_tiny_shakespeare()


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  text = _shakespeare()
  prefix = tmp_path_factory.mktemp("sp") / "shakespeare"
  return train_sentencepiece(text[:300_000], vocab_size=700, model_prefix=prefix), text


def test_sentencepiece_round_trip_shakespeare_lines(sp_tokenizer):
  tok, text = sp_tokenizer
  assert isinstance(tok, Tokenizer)
  assert tok.vocab_size == 700
  lines = text.splitlines(keepends=True)
  held_out = lines[-400:]  # not in the 300k training prefix
  for line in lines[:200] + held_out:
    assert tok.decode(tok.encode(line)) == line
  chunk = text[-20_000:]
  ids = tok.encode(chunk)
  assert tok.decode(ids) == chunk
  # BPE compresses: far fewer tokens than characters.
  assert len(ids) < 0.6 * len(chunk)


def test_sentencepiece_round_trip_odd_strings(sp_tokenizer):
  tok, _ = sp_tokenizer
  for s in ODD_STRINGS:
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s, repr(s)
  # Unseen characters go through byte fallback, not <unk>.
  assert tok.unk_id not in tok.encode("中文 😀")


def test_sentencepiece_newlines_and_bos(sp_tokenizer, tmp_path):
  tok, _ = sp_tokenizer
  pieces = [tok.id_to_piece(i) for i in tok.encode("First Citizen:\nBefore")]
  # Newlines are learned as pieces (training kept them), not byte-fallback <0x0A>.
  assert "<0x0A>" not in pieces and any("\n" in p for p in pieces)
  assert tok.encode("hi", add_bos=True)[0] == tok.bos_id == 1
  assert tok.eos_ids == (2,)
  reloaded = SentencePieceTokenizer(tok.path)
  assert reloaded.encode("Before we proceed") == tok.encode("Before we proceed")


def test_train_sentencepiece_from_files_is_deterministic(tmp_path):
  text = _shakespeare()[:50_000]
  corpus = tmp_path / "a.txt"
  corpus.write_text(text, encoding="utf-8")
  a = train_sentencepiece([corpus], vocab_size=400, model_prefix=tmp_path / "a")
  b = train_sentencepiece(text, vocab_size=400, model_prefix=tmp_path / "b")
  sample = text[:2000]
  assert a.encode(sample) == b.encode(sample)
  assert a.decode(a.encode(sample)) == sample
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_sentencepiece(text, vocab_size=100, model_prefix=tmp_path / "c")


# ------------------------------------------------------------------ HF tokenizer.json


@pytest.fixture(scope="module")
def hf_reference():
  directory = FIXTURES / "hf_llama_tied"
  return HFTokenizer(directory), json.loads((directory / "tokenizer_reference.json").read_text())


def test_hf_tokenizer_ids_match_transformers(hf_reference):
  tok, ref = hf_reference
  assert isinstance(tok, Tokenizer)
  for text, ids, decoded in zip(ref["texts"], ref["ids"], ref["decoded"], strict=True):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == decoded
  assert tok.encode(ref["texts"][0], add_bos=True) == [ref["bos_id"], *ref["ids"][0]]
  assert tok.vocab_size == ref["vocab_size"]


def test_hf_chat_template_matches_transformers(hf_reference):
  tok, ref = hf_reference
  assert tok.apply_chat_template(ref["messages"]) == ref["chat"]
  assert (
    tok.apply_chat_template(ref["messages"], add_generation_prompt=False)
    == ref["chat_no_generation_prompt"]
  )
  assert tok.apply_chat_template(ref["messages_with_system"]) == ref["chat_with_system"]
  assert tok.encode(ref["chat"]) == ref["chat_ids"]  # special tokens stay whole
  # The template's raise_exception reaches the caller.
  import jinja2

  with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_hf_tokenizer_reads_v4_style_template_from_config(tmp_path, hf_reference):
  """transformers v4 kept chat_template inside tokenizer_config.json (v5: chat_template.jinja)."""
  import shutil

  _, ref = hf_reference
  src = FIXTURES / "hf_llama_tied"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(src / name, tmp_path / name)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["chat_template"] = (src / "chat_template.jinja").read_text()
  config["bos_token"] = {"content": "<s>", "special": True}  # v4 AddedToken dict form
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  tok = HFTokenizer(tmp_path / "tokenizer.json")
  assert tok.apply_chat_template(ref["messages"]) == ref["chat"]
  assert tok.bos_id == ref["bos_id"]


def test_render_chat_template_tojson_and_namespace():
  template = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}{% endfor %}{{ ns.n }}"
  )
  out = render_chat_template(template, [{"role": "user", "content": "<a & b>"}])
  assert out == '{"role": "user", "content": "<a & b>"}1'  # no HTML escaping
