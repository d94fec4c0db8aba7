"""Tokenizers: SentencePiece training round trips, HF tokenizer.json, GGUF byte-level BPE."""

import pathlib

import pytest

from qstar_jax.models.tokenizer import (
  SentencePieceTokenizer,
  Tokenizer,
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


def _data_dir() -> pathlib.Path:
  try:
    from qstar_jax.data.paths import data_dir
  except ImportError:  # the data helper's module is not there yet
    import os

    root = pathlib.Path(__file__).resolve().parents[1]
    return pathlib.Path(os.environ.get("QSTAR_DATA_DIR", root.parent / "shared" / "data"))
  return pathlib.Path(data_dir())


def _shakespeare() -> str:
  path = _data_dir() / "tinyshakespeare" / "input.txt"
  if not path.is_file():
    pytest.skip(f"tiny Shakespeare not found at {path}")
  return path.read_text(encoding="utf-8")


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
