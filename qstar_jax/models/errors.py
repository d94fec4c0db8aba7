"""Exception types for loading checkpoints, tokenizers and validating prompts.

Every error names the offending value (a tensor name, a shape, a file, a vocabulary size) and
what was expected, and is raised before any model state is changed (no partial loads).
"""

__all__ = [
  "QstarError",
  "CheckpointError",
  "ShapeMismatchError",
  "UnknownArchitectureError",
  "CorruptFileError",
  "TokenizerMismatchError",
  "PromptError",
  "check_tensor_names",
]


class QstarError(Exception):
  """Base class of every error raised by qstar_jax."""


class CheckpointError(QstarError, ValueError):
  """A checkpoint cannot be loaded: missing/unexpected tensors, bad config, unreadable file."""


class ShapeMismatchError(CheckpointError):
  """A checkpoint tensor's shape differs from the shape the model config expects."""


class UnknownArchitectureError(CheckpointError):
  """The checkpoint declares an architecture this library does not implement."""


class CorruptFileError(CheckpointError):
  """A checkpoint file is truncated or its header cannot be parsed."""


class TokenizerMismatchError(QstarError, ValueError):
  """The tokenizer's vocabulary does not fit the model's embedding table."""


class PromptError(QstarError, ValueError):
  """A prompt is empty or longer than the model's context."""


def check_tensor_names(missing, unexpected, *, context: str) -> None:
  """Raises `CheckpointError` listing `missing` and `unexpected` tensor names, if any.

  `context` opens the message ("parameters do not match the model layout").
  """
  parts = []
  if missing:
    parts.append(f"missing tensors {sorted(missing)}")
  if unexpected:
    parts.append(f"unexpected tensors {sorted(unexpected)}")
  if parts:
    raise CheckpointError(f"{context}: " + "; ".join(parts))
