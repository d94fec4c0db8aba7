"""Tokenizers: Hugging Face `tokenizer.json`, the BPE vocabulary inside a GGUF, SentencePiece.

Every tokenizer follows one protocol (`Tokenizer`):

  encode(text, add_bos=False) -> list[int]     # never adds special tokens unless add_bos
  decode(ids) -> str                           # special tokens are kept in the text
  vocab_size: int                              # max token id + 1
  bos_id: int | None
  eos_ids: tuple[int, ...]
  apply_chat_template(messages, add_generation_prompt=True) -> str

Chat prompts are rendered from the model's own Jinja chat template, in the same sandboxed
environment as Hugging Face transformers (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, a `tojson` that does not escape HTML).

`train_sentencepiece` trains a SentencePiece BPE/unigram model on a local corpus for small
experiments, with settings that make `decode(encode(s)) == s` for every string: identity
normalisation, no whitespace collapsing, no dummy prefix, byte fallback.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = [
  "Tokenizer",
  "HFTokenizer",
  "GGUFTokenizer",
  "SentencePieceTokenizer",
  "train_sentencepiece",
  "render_chat_template",
]


@runtime_checkable
class Tokenizer(Protocol):
  """The interface every tokenizer of qstar_jax implements."""

  vocab_size: int
  bos_id: int | None
  eos_ids: tuple[int, ...]

  def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...

  def apply_chat_template(
    self, messages: list[dict], add_generation_prompt: bool = True
  ) -> str: ...


# ----------------------------------------------------------------------------- chat templates


def _compile_chat_template(template: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


def render_chat_template(
  template: str,
  messages: Sequence[Mapping[str, Any]],
  *,
  add_generation_prompt: bool = True,
  special_tokens: Mapping[str, str | None] | None = None,
  **kwargs: Any,
) -> str:
  """Renders `messages` ([{"role": ..., "content": ...}, ...]) with a Jinja chat template.

  `special_tokens` (bos_token, eos_token, ...) are passed to the template as variables, as
  transformers does.
  """
  compiled = _compile_chat_template(template)
  variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
  variables.update(kwargs)
  return compiled.render(
    messages=[dict(m) for m in messages],
    add_generation_prompt=add_generation_prompt,
    tools=None,
    documents=None,
    **variables,
  )


# ------------------------------------------------------------------- tokenizers-backed (BPE)


class _BackendTokenizer:
  """Shared code of the tokenizers built on the `tokenizers` library."""

  def __init__(
    self,
    backend,
    *,
    bos_id: int | None,
    eos_ids: Sequence[int],
    chat_template: str | None,
    special_tokens: Mapping[str, str | None],
  ):
    self._backend = backend
    self.bos_id = None if bos_id is None else int(bos_id)
    self.eos_ids = tuple(int(i) for i in eos_ids)
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens)
    vocab = backend.get_vocab(with_added_tokens=True)
    self.vocab_size = (max(vocab.values()) + 1) if vocab else 0

  @property
  def backend(self):
    """The underlying `tokenizers.Tokenizer`."""
    return self._backend

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._backend.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id, *ids]
    return list(ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._backend.id_to_token(int(token_id))

  def apply_chat_template(
    self, messages: list[dict], add_generation_prompt: bool = True
  ) -> str:
    if not self.chat_template:
      raise ValueError(f"{type(self).__name__} has no chat template")
    return render_chat_template(
      self.chat_template,
      messages,
      add_generation_prompt=add_generation_prompt,
      special_tokens=self.special_tokens,
    )


def _token_content(token: Any) -> str | None:
  """A special token from tokenizer_config.json: a string or {"content": ...}."""
  if token is None:
    return None
  if isinstance(token, str):
    return token
  if isinstance(token, Mapping):
    return token.get("content")
  return None


class HFTokenizer(_BackendTokenizer):
  """A Hugging Face fast tokenizer (`tokenizer.json`) with its chat template.

  Args:
    path: a directory holding `tokenizer.json` (and optionally `tokenizer_config.json`,
      `special_tokens_map.json`, `chat_template.jinja`, `generation_config.json`), or the
      `tokenizer.json` file itself.
    eos_ids: overrides the end-of-sequence ids (e.g. from the model's config.json).
  """

  def __init__(self, path: str | os.PathLike, *, eos_ids: Sequence[int] | None = None):
    from tokenizers import Tokenizer as BackendTokenizer

    path = pathlib.Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(f"no tokenizer.json at {file}")
    backend = BackendTokenizer.from_file(str(file))

    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    special = {n: _token_content(config.get(n, special_map.get(n))) for n in names}

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in chat_template}
      chat_template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"  # transformers v5 saves it beside the config
    if chat_template is None and jinja_file.is_file():
      chat_template = jinja_file.read_text(encoding="utf-8")

    bos_id = backend.token_to_id(special["bos_token"]) if special["bos_token"] else None
    if eos_ids is None:
      generation = _read_json(directory / "generation_config.json")
      eos = generation.get("eos_token_id")
      if eos is None and special["eos_token"]:
        eos = backend.token_to_id(special["eos_token"])
      eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
    super().__init__(
      backend,
      bos_id=bos_id,
      eos_ids=eos_ids,
      chat_template=chat_template,
      special_tokens=special,
    )
    self.path = file


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# llama.cpp's `tokenizer.ggml.pre` names -> how text is split before BPE (llama-vocab.cpp).
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "\p{N}" first (every digit alone), then the GPT-2 expression.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"gpt-2", "gpt2", "default", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de"}
_REGEX_SPLITS = {
  "llama3": _LLAMA3_SPLIT,
  "llama-v3": _LLAMA3_SPLIT,
  "llama-bpe": _LLAMA3_SPLIT,
  "smaug-bpe": _LLAMA3_SPLIT,
  "dbrx": _LLAMA3_SPLIT,
  "falcon3": _LLAMA3_SPLIT,
  "qwen2": _QWEN2_SPLIT,
  "deepseek-r1-qwen": _QWEN2_SPLIT,
  "megrez": _QWEN2_SPLIT,
}


def _byte_level_pre_tokenizer(pre: str | None):
  from tokenizers import Regex, pre_tokenizers

  if pre in _DIGITS_THEN_GPT2:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
    )
  if pre in _REGEX_SPLITS:
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  if pre is not None and pre not in _GPT2:
    warnings.warn(
      f"GGUF tokenizer.ggml.pre={pre!r} is not known here; splitting text with the GPT-2 "
      "expression (known: " + ", ".join(sorted(_DIGITS_THEN_GPT2 | _GPT2 | set(_REGEX_SPLITS))) + ")",
      stacklevel=3,
    )
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  chars = list(printable)
  n = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


# llama.cpp token types (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


class GGUFTokenizer(_BackendTokenizer):
  """The byte-level BPE tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.

  Build it with `GGUFTokenizer.from_metadata(fields)` where `fields` maps metadata keys to
  values (see `gguf_loader.read_metadata`); `gguf_loader.load_gguf_tokenizer(path)` reads
  them from a file.
  Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE, used by Llama-3, SmolLM, Qwen2
  conversions) is supported.
  """

  @classmethod
  def from_metadata(cls, meta: Mapping[str, Any]) -> GGUFTokenizer:
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as BackendTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
        f"GGUF tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' (byte-level BPE)"
      )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    token_types = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))

    alphabet = set(_bytes_to_unicode().values())
    spelling = _bytes_to_unicode()
    vocab = {}
    for index, token in enumerate(tokens):
      # Every byte-level token is spelled in GPT-2's byte alphabet; respell any that is not.
      if not set(token) <= alphabet:
        token = "".join(spelling[b] for b in token.encode("utf-8"))
      vocab.setdefault(token, index)
    backend = BackendTokenizer(
      models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)

    control = [
      AddedToken(t, normalized=False, special=True)
      for t, kind in zip(tokens, token_types, strict=True)
      if kind == _TOKEN_CONTROL and set(t) <= alphabet
    ]
    if control:
      backend.add_special_tokens(control)
    user = [
      AddedToken(t, normalized=False, special=False)
      for t, kind in zip(tokens, token_types, strict=True)
      if kind == _TOKEN_USER_DEFINED and t in vocab
    ]
    if user:
      backend.add_tokens(user)

    def token_of(key: str) -> str | None:
      i = meta.get(key)
      return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [] if eos_id is None else [int(eos_id)]
    eot_id = meta.get("tokenizer.ggml.eot_token_id")  # end of turn (Llama-3 <|eot_id|>)
    if eot_id is not None and int(eot_id) not in eos_ids:
      eos_ids.append(int(eot_id))
    special = {
      "bos_token": token_of("tokenizer.ggml.bos_token_id"),
      "eos_token": token_of("tokenizer.ggml.eos_token_id"),
      "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
      "pad_token": token_of("tokenizer.ggml.padding_token_id"),
    }
    return cls(
      backend,
      bos_id=None if bos_id is None else int(bos_id),
      eos_ids=eos_ids,
      chat_template=meta.get("tokenizer.chat_template"),
      special_tokens=special,
    )


# ---------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer:
  """A SentencePiece model (`.model` file).

  Args:
    model_path: path of the `.model` file.
    chat_template: optional Jinja chat template (SentencePiece files carry none).
  """

  def __init__(self, model_path: str | os.PathLike, *, chat_template: str | None = None):
    import sentencepiece as spm

    model_path = pathlib.Path(model_path)
    if not model_path.is_file():
      raise FileNotFoundError(f"no SentencePiece model at {model_path}")
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_ids = (self._sp.eos_id(),) if self._sp.eos_id() >= 0 else ()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
    self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
    self.chat_template = chat_template

  @property
  def processor(self):
    """The underlying `sentencepiece.SentencePieceProcessor`."""
    return self._sp

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._sp.encode(text, out_type=int)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but this SentencePiece model has no BOS piece")
      ids = [self.bos_id, *ids]
    return list(ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in self._sp.encode(list(texts), out_type=int)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def apply_chat_template(
    self, messages: list[dict], add_generation_prompt: bool = True
  ) -> str:
    if not self.chat_template:
      raise ValueError(f"SentencePiece model {self.path} has no chat template")
    return render_chat_template(
      self.chat_template, messages, add_generation_prompt=add_generation_prompt
    )


def _line_chunks(text: str, *, max_chars: int) -> Iterable[str]:
  """Splits text into chunks of whole lines (newlines kept), each at most ~max_chars long."""
  chunk: list[str] = []
  size = 0
  for line in text.splitlines(keepends=True):
    if chunk and size + len(line) > max_chars:
      yield "".join(chunk)
      chunk, size = [], 0
    chunk.append(line)
    size += len(line)
  if chunk:
    yield "".join(chunk)


def train_sentencepiece(
  text_or_files: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  vocab_size: int,
  model_prefix: str | os.PathLike,
  model_type: str = "bpe",
  character_coverage: float = 1.0,
  max_sentence_length: int = 1 << 16,
  num_threads: int = 1,
  user_defined_symbols: Sequence[str] = (),
) -> SentencePieceTokenizer:
  """Trains a SentencePiece model whose encoding round-trips exactly.

  Settings: identity normalisation (no NFKC), whitespace kept as is (no collapsing, no dummy
  prefix), byte fallback (any character outside the vocabulary becomes its UTF-8 bytes), digits
  split individually; ids 0..3 are <unk>, <s>, </s>, <pad>. The one string that does not round
  trip is SentencePiece's own whitespace marker U+2581 ("▁"), which decodes as a space.
  Training is deterministic for a given corpus (the whole corpus is used, no sampling).

  Args:
    text_or_files: the corpus: a `str` is the text itself; a `pathlib.Path` or a list of paths
      are UTF-8 text files (read whole, newlines kept).
    vocab_size: number of pieces (must exceed 4 specials + 256 bytes for byte fallback).
    model_prefix: output path prefix; writes `<prefix>.model` and `<prefix>.vocab`.
    model_type: "bpe" or "unigram" (also "char", "word").
    user_defined_symbols: strings that are always exactly one piece, never merged with their
      neighbours (e.g. ``"\n"`` when a newline delimits reasoning steps).

  Returns:
    the trained `SentencePieceTokenizer`.
  """
  import sentencepiece as spm

  if model_type not in ("bpe", "unigram", "char", "word"):
    raise ValueError(f"model_type={model_type!r}; expected 'bpe', 'unigram', 'char' or 'word'")
  min_size = 4 + 256 + 1
  if vocab_size < min_size:
    raise ValueError(
      f"vocab_size={vocab_size} is too small: byte fallback needs >= {min_size} "
      "(4 special pieces + 256 bytes + at least one piece)"
    )
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)

  options = dict(
    model_prefix=str(prefix),
    vocab_size=int(vocab_size),
    model_type=model_type,
    character_coverage=character_coverage,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    max_sentence_length=max_sentence_length,
    num_threads=num_threads,
    minloglevel=2,
  )
  if user_defined_symbols:
    if any(not isinstance(u, str) or not u for u in user_defined_symbols):
      raise ValueError(f"user_defined_symbols={list(user_defined_symbols)!r}: expected "
                       "non-empty strings")
    options["user_defined_symbols"] = list(user_defined_symbols)
  if isinstance(text_or_files, str):
    text = text_or_files
  else:
    paths = (
      [pathlib.Path(text_or_files)]
      if isinstance(text_or_files, os.PathLike)
      else [pathlib.Path(f) for f in text_or_files]
    )
    for f in paths:
      if not f.is_file():
        raise FileNotFoundError(f"corpus file {f} does not exist")
    text = "".join(f.read_text(encoding="utf-8") for f in paths)
  if not text:
    raise ValueError("train_sentencepiece got an empty corpus")
  # SentencePiece reads its input one line per sentence, so a file corpus would never show it a
  # newline. Feed chunks of whole lines with their newlines kept instead, so that "\n" gets
  # pieces of its own (and merges such as ":\n") rather than byte fallback.
  spm.SentencePieceTrainer.train(
    sentence_iterator=_line_chunks(text, max_chars=max_sentence_length // 8), **options
  )
  return SentencePieceTokenizer(f"{prefix}.model")
