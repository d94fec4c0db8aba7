"""A device mesh from config: named axes ``data``, ``fsdp``, ``tensor``.

``MeshConfig(data=-1, fsdp=1, tensor=1)`` means "all devices data-parallel"; one axis may be
``-1`` ("the rest": the device count divided by the product of the others). The mesh is a plain
``jax.sharding.Mesh`` (auto axes: XLA's SPMD partitioner places the collectives); on a multi-host
run it spans every process's devices (``jax.devices()``), ordered by
``jax.experimental.mesh_utils`` so that ``tensor`` (the innermost axis) stays on fast links.

What each axis splits:

- ``data``: the batch (problems of a search, examples of a training step); parameters are
  replicated across it;
- ``fsdp``: the batch too, and every parameter and optimizer-state leaf (ZeRO-3 style: each weight
  is gathered where it is used, gradients are reduce-scattered);
- ``tensor``: the hidden dimensions of the attention heads and the MLP (Megatron style); the batch
  is replicated across it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from qstar_jax.models.errors import QstarError

__all__ = [
  "AXES",
  "BATCH_AXES",
  "MeshConfig",
  "MeshShapeError",
  "mesh_config_from",
  "resolve_axis_sizes",
  "make_mesh",
  "mesh_summary",
]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")   # the axes a batch (or a search's problems) is split over


class MeshShapeError(QstarError, ValueError):
  """A mesh shape does not fit the devices, or a tensor's dimension does not divide over it."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes of the device mesh; one may be -1 ("the rest of the devices")."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  def sizes(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)


def mesh_config_from(spec: MeshConfig | Mapping[str, Any] | str | None) -> MeshConfig:
  """A ``MeshConfig`` from a config, a dict (``{"fsdp": 8}``) or a string (``"data=2,tensor=4"``);
  None: the default (all devices on ``data``)."""
  if spec is None:
    return MeshConfig()
  if isinstance(spec, MeshConfig):
    return spec
  if isinstance(spec, str):
    items = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, sep, value = part.partition("=")
      if not sep:
        raise MeshShapeError(f"mesh spec {spec!r}: {part!r} is not AXIS=SIZE "
                             f"(axes {', '.join(AXES)})")
      try:
        items[name.strip()] = int(value)
      except ValueError:
        raise MeshShapeError(f"mesh spec {spec!r}: size {value!r} of axis {name!r} is not an "
                             "integer") from None
    spec = items
  unknown = sorted(set(spec) - set(AXES))
  if unknown:
    raise MeshShapeError(f"mesh axes {unknown}: expected only {list(AXES)}")
  sizes = {}
  for name, value in spec.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise MeshShapeError(f"mesh axis {name}={value!r}: expected an integer (-1 for the rest)")
    sizes[name] = int(value)
  if "data" not in sizes:
    # {"fsdp": 4} on 8 devices: the rest (2) on data; {"fsdp": -1}: fsdp is the rest, data 1.
    sizes["data"] = 1 if -1 in sizes.values() else -1
  return MeshConfig(**sizes)


def resolve_axis_sizes(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """The three axis sizes for ``num_devices`` devices, with the ``-1`` axis filled in.

  Raises ``MeshShapeError`` naming the shape and the device count when they do not fit.
  """
  sizes = config.sizes()
  shape = ", ".join(f"{n}={s}" for n, s in zip(AXES, sizes, strict=True))
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshShapeError(f"mesh ({shape}): every axis size must be >= 1, or -1 for the rest")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise MeshShapeError(f"mesh ({shape}): at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise MeshShapeError(
        f"mesh ({shape}) does not divide the {num_devices} devices: the fixed axes need a "
        f"multiple of {fixed} devices")
    out = list(sizes)
    out[free[0]] = num_devices // fixed
    return tuple(out)
  if fixed != num_devices:
    raise MeshShapeError(
      f"mesh ({shape}) has {fixed} devices but {num_devices} are available; give sizes whose "
      "product is the device count, or -1 on one axis")
  return tuple(sizes)


def make_mesh(spec: MeshConfig | Mapping[str, Any] | str | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ``Mesh`` of ``spec`` over ``devices`` (default: every device of every process).

  Example::

    mesh = make_mesh("fsdp=-1")                      # ZeRO-3 over all devices
    mesh = make_mesh(MeshConfig(data=2, tensor=4))   # 2-way data x 4-way tensor parallel
  """
  config = mesh_config_from(spec)
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise MeshShapeError("make_mesh: no devices given")
  shape = resolve_axis_sizes(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES)


def mesh_summary(mesh: Mesh) -> dict[str, Any]:
  """JSON-ready description: axis sizes, device count and platform."""
  return {"axes": dict(mesh.shape), "devices": int(mesh.devices.size),
          "platform": mesh.devices.flat[0].platform}
