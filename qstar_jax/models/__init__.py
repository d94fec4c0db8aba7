"""qstar_jax.models."""

__all__: list[str] = []

# Tokenizers and errors (loading helper).
from qstar_jax.models import errors  # noqa: E402
from qstar_jax.models.tokenizer import (  # noqa: E402
  GGUFTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  train_sentencepiece,
)

__all__ += [
  "errors",
  "GGUFTokenizer",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "train_sentencepiece",
]
