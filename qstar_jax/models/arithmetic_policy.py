"""The committed arithmetic policy: a small Llama, its SentencePiece tokenizer and its outcome
value head, saved as one folder and loaded as one frozen `ArithmeticPolicy`.

Folder layout (written by `save_arithmetic_policy`, read by `load_arithmetic_policy`):

- ``tokenizer.model``: the SentencePiece model ("\\n" is always exactly one piece, digits are
  single pieces; ids 0..3 are <unk>, <s>, </s>, <pad>);
- ``params.npz``: float32 arrays, ``policy.<dotted Llama parameter name>`` and
  ``value.kernel`` [D, 1], ``value.bias`` [1] (the `ValueHead` on the policy's final-normed
  hidden states; the trunk is frozen, so one forward gives logits and values);
- ``config.json``: ``llama`` (the `LlamaConfig` as a dict), ``prompt_format`` (a ``str.format``
  string with one ``{question}`` field; the prompt ids are ``[BOS] + encode(prompt)``),
  ``newline_id``, ``eos_id``, ``step_stop_ids`` (the step delimiters: a step is the tokens of one
  solution line including its newline, or the last line including EOS), and the training
  record (``training_command``, ``seed``, accuracies, value head metrics);
- ``README.md``: how the folder was made.

The default folder is ``qstar_jax/assets/arithmetic_policy`` inside the installed package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qstar_jax.models.config import LlamaConfig
from qstar_jax.models.errors import CheckpointError
from qstar_jax.models.heads import ValueHead
from qstar_jax.models.llama import Llama, from_flat_params, get_flat_params
from qstar_jax.models.tokenizer import SentencePieceTokenizer

__all__ = [
  "ARITHMETIC_POLICY_FILES",
  "ArithmeticPolicy",
  "arithmetic_policy_fingerprint",
  "default_arithmetic_policy_dir",
  "load_arithmetic_policy",
  "save_arithmetic_policy",
  "save_trained_policy",
]

TOKENIZER_FILE = "tokenizer.model"
PARAMS_FILE = "params.npz"
CONFIG_FILE = "config.json"
README_FILE = "README.md"
ARITHMETIC_POLICY_FILES = (TOKENIZER_FILE, PARAMS_FILE, CONFIG_FILE, README_FILE)
_POLICY_PREFIX = "policy."
_VALUE_PREFIX = "value."


def default_arithmetic_policy_dir() -> pathlib.Path:
  """``qstar_jax/assets/arithmetic_policy`` of this installation (package data)."""
  return pathlib.Path(__file__).resolve().parents[1] / "assets" / "arithmetic_policy"


@dataclasses.dataclass(frozen=True)
class ArithmeticPolicy:
  """The loaded policy: split Llama, split value head, tokenizer and the task's format.

  ``value_apply(hidden [..., D]) -> [...]`` is ``nnx.merge(value_graphdef, value_params)``'s
  call; the searches read the hidden states that decoding returns (``DecodeResult.last_hidden``).
  """

  graphdef: nnx.GraphDef           # of the Llama
  params: Any                      # nnx.State of the Llama (float32)
  value_graphdef: nnx.GraphDef     # of the ValueHead
  value_params: Any                # nnx.State: kernel [D, 1], bias [1] float32
  tokenizer: SentencePieceTokenizer
  config: dict[str, Any]           # config.json as read
  model_config: LlamaConfig
  newline_id: int
  eos_id: int
  bos_id: int
  pad_id: int
  step_stop_ids: tuple[int, ...]   # step delimiters: (newline_id, eos_id)
  prompt_format: str               # e.g. "Q: {question}\nA:\n"
  path: pathlib.Path

  def prompt_ids(self, prompt: str) -> list[int]:
    """``[BOS] + encode(prompt)``: how the policy was trained to read a prompt."""
    return [self.bos_id, *self.tokenizer.encode(prompt)]

  def value(self, hidden: Any) -> Any:
    """The value head on final-normed hidden states: ``[..., D] -> [...]`` float32."""
    return nnx.merge(self.value_graphdef, self.value_params)(jnp.asarray(hidden))

  def value_head(self) -> dict[str, Any]:
    """The value head's arrays ``{"kernel": [D, 1], "bias": [1]}`` (float32), the form the
    searches' value params and the trainers take."""
    head = nnx.merge(self.value_graphdef, self.value_params)
    return {"kernel": head.kernel[...], "bias": head.bias[...]}


def _value_head(kernel: np.ndarray, bias: np.ndarray) -> ValueHead:
  head = nnx.eval_shape(lambda: ValueHead(kernel.shape[0], rngs=nnx.Rngs(0)))
  head.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
  head.bias = nnx.Param(jnp.asarray(bias, jnp.float32))
  return head


def save_arithmetic_policy(
  directory: str | os.PathLike, *, model: Llama, value_kernel: np.ndarray,
  value_bias: np.ndarray, tokenizer_path: str | os.PathLike, config: Mapping[str, Any],
  readme: str,
) -> pathlib.Path:
  """Writes the folder described in the module docstring; returns it.

  Args:
    model: the trained Llama (its config is stored as ``config["llama"]``).
    value_kernel, value_bias: the value head, [D, 1] and [1].
    tokenizer_path: the SentencePiece ``.model`` file (copied).
    config: the rest of ``config.json`` (must hold ``prompt_format``, ``newline_id``,
      ``eos_id``, ``step_stop_ids``).
  """
  missing = [k for k in ("prompt_format", "newline_id", "eos_id", "step_stop_ids")
             if k not in config]
  if missing:
    raise ValueError(f"config is missing {missing}")
  d = model.config.hidden_size
  if np.shape(value_kernel) != (d, 1) or np.shape(value_bias) != (1,):
    raise ValueError(f"value head shapes {np.shape(value_kernel)}, {np.shape(value_bias)}: "
                     f"expected ({d}, 1) and (1,)")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  arrays = {_POLICY_PREFIX + k: np.asarray(v, np.float32)
            for k, v in get_flat_params(model).items()}
  arrays[_VALUE_PREFIX + "kernel"] = np.asarray(value_kernel, np.float32)
  arrays[_VALUE_PREFIX + "bias"] = np.asarray(value_bias, np.float32)
  np.savez_compressed(directory / PARAMS_FILE, **arrays)
  (directory / TOKENIZER_FILE).write_bytes(pathlib.Path(tokenizer_path).read_bytes())
  record = {"llama": model.config.to_dict(), **config}
  (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
  (directory / README_FILE).write_text(readme)
  return directory


def save_trained_policy(directory: str | os.PathLike, base: ArithmeticPolicy, params: Any,
                        value_head: Mapping[str, Any], *, training: Any,
                        readme: str) -> pathlib.Path:
  """Writes a model trained from ``base`` (a value, Q or policy model of it) as an
  arithmetic-policy folder: ``params`` (the Llama state, ``base.graphdef``'s), ``value_head``
  (``{"kernel": [D, 1], "bias": [1]}``), ``base``'s tokenizer and task format, and ``training``
  (what made it) as ``config["value_training"]``. `load_arithmetic_policy` reads it back."""
  config = {k: v for k, v in base.config.items() if k != "llama"}
  return save_arithmetic_policy(
    directory, model=nnx.merge(base.graphdef, params),
    value_kernel=np.asarray(value_head["kernel"]), value_bias=np.asarray(value_head["bias"]),
    tokenizer_path=base.path / TOKENIZER_FILE, config={**config, "value_training": training},
    readme=readme)


def arithmetic_policy_fingerprint(path: str | os.PathLike | None = None) -> str:
  """A short digest of a policy folder's files (tokenizer, parameters, config; default the
  committed policy): equal for the same files, different after a retraining. Experiments record
  it beside their settings so that stage files made with another policy are not reused."""
  directory = default_arithmetic_policy_dir() if path is None else pathlib.Path(path)
  digest = hashlib.sha256()
  for name in (TOKENIZER_FILE, PARAMS_FILE, CONFIG_FILE):
    file = directory / name
    if not file.is_file():
      raise CheckpointError(f"arithmetic policy folder {directory} lacks {name}")
    digest.update(name.encode() + b"\0" + file.read_bytes())
  return digest.hexdigest()[:16]


def _require(config: Mapping[str, Any], key: str, path: pathlib.Path) -> Any:
  if key not in config:
    raise CheckpointError(f"{path / CONFIG_FILE} has no {key!r} entry")
  return config[key]


def load_arithmetic_policy(path: str | os.PathLike | None = None) -> ArithmeticPolicy:
  """The policy folder at ``path`` (default: `default_arithmetic_policy_dir()`).

  Raises:
    CheckpointError: a missing file (named with the folder), a config entry missing, or
      parameters that do not match the stored Llama config.
  """
  directory = default_arithmetic_policy_dir() if path is None else pathlib.Path(path)
  missing = [f for f in (TOKENIZER_FILE, PARAMS_FILE, CONFIG_FILE)
             if not (directory / f).is_file()]
  if missing:
    raise CheckpointError(
      f"arithmetic policy folder {directory} lacks {', '.join(missing)}; train one with "
      "`python -m experiments.train_arithmetic_policy out=DIR` and pass path=DIR (or "
      "install=true to write the package's assets)")
  config = json.loads((directory / CONFIG_FILE).read_text())
  model_config = LlamaConfig.from_dict(_require(config, "llama", directory))
  with np.load(directory / PARAMS_FILE) as data:
    arrays = {k: data[k] for k in data.files}
  flat = {k[len(_POLICY_PREFIX):]: v for k, v in arrays.items() if k.startswith(_POLICY_PREFIX)}
  try:
    model = from_flat_params(model_config, flat)
    kernel, bias = arrays[_VALUE_PREFIX + "kernel"], arrays[_VALUE_PREFIX + "bias"]
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{directory / PARAMS_FILE}: {e}") from e
  if kernel.shape != (model_config.hidden_size, 1) or bias.shape != (1,):
    raise CheckpointError(f"{directory / PARAMS_FILE}: value head shapes {kernel.shape}, "
                          f"{bias.shape}; expected ({model_config.hidden_size}, 1) and (1,)")
  graphdef, params = nnx.split(model)
  value_graphdef, value_params = nnx.split(_value_head(kernel, bias))
  tokenizer = SentencePieceTokenizer(directory / TOKENIZER_FILE)
  stop_ids: Sequence[int] = _require(config, "step_stop_ids", directory)
  return ArithmeticPolicy(
    graphdef=graphdef, params=params, value_graphdef=value_graphdef, value_params=value_params,
    tokenizer=tokenizer, config=config, model_config=model_config,
    newline_id=int(_require(config, "newline_id", directory)),
    eos_id=int(_require(config, "eos_id", directory)), bos_id=int(tokenizer.bos_id),
    pad_id=int(tokenizer.pad_id), step_stop_ids=tuple(int(i) for i in stop_ids),
    prompt_format=str(_require(config, "prompt_format", directory)), path=directory)
