"""Orbax checkpoints: a run's step checkpoints (auto-resume) and single model checkpoints.

Layout of a run's checkpoint folder (``CheckpointManager``)::

  directory/
    config.json      the run's config (as given); a reopened folder must match it
    meta.json        {"qstar_jax_version", "jax_version", "orbax_version"}
    <step>/          orbax step folders (the newest ``max_to_keep``)

Layout of a model checkpoint (``save_model``)::

  path/
    model.json       {"model_class", "config_class", "config": config.to_dict(), "has_opt_state", versions}
    model/           orbax pytree: the nnx pure state dict (RNG streams excluded)
    opt_state/       orbax pytree: the optimizer state (optional)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qstar_jax import __version__
from qstar_jax.distributed import DEFAULT_RULES, param_shardings
from qstar_jax.models.errors import CheckpointError
from qstar_jax.training.config import config_from_dict, config_to_dict, flatten_dict

__all__ = [
  "CheckpointConfigMismatchError",
  "CheckpointManager",
  "save_model",
  "load_model",
  "abstract_like",
  "config_differences",
]

_MISSING = "<missing>"


class CheckpointConfigMismatchError(CheckpointError):
  """A checkpoint was written with a different config than the one it is opened with."""

  def __init__(self, path: str | os.PathLike, differences: Mapping[str, tuple[Any, Any]]):
    self.path = str(path)
    self.differences = dict(differences)
    lines = [
      f"  {k}: checkpoint has {saved!r}, current config has {new!r}"
      for k, (saved, new) in sorted(self.differences.items())
    ]
    super().__init__(
      f"checkpoint at {self.path} was written with a different config "
      f"({len(lines)} key(s) differ):\n" + "\n".join(lines) + "\n"
      "Use a new output folder, or rerun with the checkpoint's values."
    )


def config_differences(
  saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore_keys: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
  """Flattened keys whose values differ: ``{key: (saved, current)}`` (absent -> ``"<missing>"``)."""
  a = flatten_dict(json.loads(json.dumps(saved)))
  b = flatten_dict(json.loads(json.dumps(current)))
  diffs = {}
  for k in sorted(set(a) | set(b)):
    if any(k == ig or k.startswith(ig + ".") for ig in ignore_keys):
      continue
    va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
    if va != vb:
      diffs[k] = (va, vb)
  return diffs


def _versions() -> dict[str, str]:
  return {
    "qstar_jax_version": __version__,
    "jax_version": jax.__version__,
    "orbax_version": getattr(ocp, "__version__", "unknown"),
  }


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def abstract_like(tree: Any) -> Any:
  """Abstract restore target: arrays -> ``jax.ShapeDtypeStruct`` with their sharding.

  Leaves that are already ``ShapeDtypeStruct`` get a single-device sharding when they have none.
  numpy arrays and Python scalars are kept as they are (restored as numpy / scalars).
  """

  def leaf(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      if getattr(x, "sharding", None) is None:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x

  return jax.tree.map(leaf, tree)


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


class CheckpointManager:
  """Step checkpoints of a run with auto-resume, config check and version stamp.

  Args:
    directory: checkpoint folder (created).
    config: the run's config as a JSON-ready dict (e.g. ``config_to_dict(cfg)``). If the folder
      already holds a ``config.json`` that differs, opening raises
      :class:`CheckpointConfigMismatchError` naming every differing key and both values.
    max_to_keep: how many step checkpoints to keep.
    ignore_keys: dotted config keys allowed to differ on reopen (e.g. ``("out",)``).
    async_save: write in a background thread (``wait()`` blocks until done).

  Example::

    mgr = CheckpointManager(out / "checkpoints", config=config_to_dict(cfg))
    start = mgr.latest_step()
    if start is not None:
      state = mgr.restore(start, target=abstract_like(state))
    ...
    mgr.save(step, state)
    mgr.close()
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    max_to_keep: int = 3,
    ignore_keys: tuple[str, ...] = (),
    async_save: bool = True,
  ):
    self.directory = pathlib.Path(directory).absolute()
    self.config = json.loads(json.dumps(config_to_dict(config)))
    self.directory.mkdir(parents=True, exist_ok=True)
    config_path = self.directory / "config.json"
    if config_path.exists():
      saved = json.loads(config_path.read_text())
      diffs = config_differences(saved, self.config, ignore_keys=ignore_keys)
      if diffs:
        raise CheckpointConfigMismatchError(self.directory, diffs)
    elif jax.process_index() == 0:
      _write_json(config_path, self.config)
    if jax.process_index() == 0:
      _write_json(self.directory / "meta.json", _versions())
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state_pytree: Any, *, force: bool = False) -> bool:
    """Saves ``state_pytree`` at ``step`` (returns False if that step already exists)."""
    step = int(step)
    if step in self._manager.all_steps():
      return False
    return bool(
      self._manager.save(step, args=ocp.args.StandardSave(state_pytree), force=force)
    )

  def latest_step(self) -> int | None:
    """The newest completed step, or None when the folder holds none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, *, target: Any) -> Any:
    """Restores ``step`` (default: the latest) into ``target``'s structure, shapes and dtypes.

    Args:
      step: step to restore; None for the latest.
      target: a pytree of ``jax.ShapeDtypeStruct`` (with shardings where they matter) or arrays.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}"
      )
    return self._manager.restore(
      int(step), args=ocp.args.StandardRestore(abstract_like(target))
    )

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------ models


def _qualname(obj_or_cls: Any) -> str:
  cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
  return f"{cls.__module__}:{cls.__qualname__}"


def _import_qualname(name: str) -> Any:
  module, _, qual = name.partition(":")
  obj = importlib.import_module(module)
  for part in qual.split("."):
    obj = getattr(obj, part)
  return obj


def _config_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    return json.loads(json.dumps(config_to_dict(config.to_dict())))
  return json.loads(json.dumps(config_to_dict(config)))


def _saved_filter():
  # RNG streams are run-time state (typed key arrays), not weights.
  return nnx.Not(nnx.RngState)


def save_model(
  path: str | os.PathLike,
  model: Any,
  *,
  opt_state: Any = None,
  config: Any = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Saves an NNX model's state (+ an optional optax state) with its config.

  Args:
    path: a new folder.
    model: an NNX module built as ``ModelClass(config, rngs=...)``.
    opt_state: optional optimizer state pytree saved beside the weights.
    config: the model config (default ``model.config``); saved with ``to_dict()``.
    overwrite: replace an existing folder.
  """
  path = pathlib.Path(path).absolute()
  config = config if config is not None else getattr(model, "config", None)
  if config is None:
    raise ValueError(
      f"save_model needs the model config: {type(model).__name__} has no .config; pass config="
    )
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"model checkpoint folder {path} exists; pass overwrite=True")
    shutil.rmtree(path)
  state = nnx.state(model, _saved_filter()).to_pure_dict()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / "model", state)
  if opt_state is not None:
    checkpointer.save(path / "opt_state", opt_state)
  checkpointer.wait_until_finished()
  checkpointer.close()
  meta = {
    "model_class": _qualname(model),
    "config_class": _qualname(config),
    "config": _config_dict(config),
    "has_opt_state": opt_state is not None,
    **_versions(),
  }
  _write_json(path / "model.json", meta)
  return path


def load_model(
  path: str | os.PathLike,
  *,
  config: Any = None,
  model_cls: type | None = None,
  opt_state_target: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: Any = None,
) -> Any:
  """Loads a model written by :func:`save_model`, refusing a config mismatch.

  Args:
    path: the model checkpoint folder.
    config: expected model config; if given and the saved one differs,
      :class:`CheckpointConfigMismatchError` names each differing field. Default: the saved one.
    model_cls: model class (default: the saved class path).
    opt_state_target: the optimizer state (or its abstract pytree) to restore into; when
      given, returns ``(model, opt_state)``.
    mesh: a device mesh: the weights are read straight into their shardings on it (each device
      reads its part; the folder may have been written from any mesh or device count), by
      ``sharding_rules`` (default :data:`qstar_jax.distributed.DEFAULT_RULES`).

  Returns:
    ``model``, or ``(model, opt_state)`` when ``opt_state_target`` is given.
  """
  path = pathlib.Path(path).absolute()
  meta_path = path / "model.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{path} is not a model checkpoint (no model.json)")
  meta = json.loads(meta_path.read_text())
  if config is not None:
    diffs = config_differences(meta["config"], _config_dict(config))
    if diffs:
      raise CheckpointConfigMismatchError(path, diffs)
  else:
    config_cls = _import_qualname(meta["config_class"])
    if hasattr(config_cls, "from_dict"):
      config = config_cls.from_dict(meta["config"])
    else:
      config = config_from_dict(config_cls, meta["config"])
  if model_cls is None:
    model_cls = _import_qualname(meta["model_class"])
  if opt_state_target is not None and not meta.get("has_opt_state"):
    raise ValueError(f"model checkpoint {path} holds no optimizer state")

  abstract_model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
  graphdef, saved_state, rest = nnx.split(abstract_model, _saved_filter(), ...)
  target = saved_state.to_pure_dict()
  if mesh is not None:
    shardings = param_shardings(target, mesh, sharding_rules or DEFAULT_RULES)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, shardings)
  checkpointer = ocp.StandardCheckpointer()
  weights = checkpointer.restore(path / "model", abstract_like(target))
  opt_state = None
  if opt_state_target is not None:
    opt_state = checkpointer.restore(path / "opt_state", abstract_like(opt_state_target))
  checkpointer.close()
  nnx.replace_by_pure_dict(saved_state, weights)
  if jax.tree.leaves(rest):
    # The model keeps run-time state (RNG streams): build it for real and load the weights.
    model = model_cls(config, rngs=nnx.Rngs(0))
    nnx.update(model, saved_state)
  else:
    model = nnx.merge(graphdef, saved_state, rest)
  if opt_state_target is not None:
    return model, opt_state
  return model


logging.getLogger("absl").setLevel(logging.WARNING)
