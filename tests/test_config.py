"""Config parsing: presets, dotted overrides, type checks, unknown keys."""

import dataclasses
from typing import Literal

import pytest

from qstar_jax.training.config import (
  ConfigError,
  config_from_dict,
  config_to_dict,
  parse_config,
)


@dataclasses.dataclass(frozen=True)
class Opt:
  lr: float = 1e-3
  betas: tuple[float, float] = (0.9, 0.95)
  schedule: Literal["cosine", "constant"] = "cosine"


@dataclasses.dataclass(frozen=True)
class Quant:
  bits: int = 4
  method: str = "quest"


@dataclasses.dataclass(frozen=True)
class Model:
  num_layers: int = 2
  hidden: int = 64
  quant: Quant | None = None


@dataclasses.dataclass(frozen=True)
class Cfg:
  out: str = "/tmp/x"
  seed: int = 0
  steps: int = 10
  tag: str | None = None
  use_bf16: bool = False
  model: Model = dataclasses.field(default_factory=Model)
  opt: Opt = dataclasses.field(default_factory=Opt)


@pytest.fixture
def presets(tmp_path):
  (tmp_path / "small.yaml").write_text("steps: 50\nmodel:\n  num_layers: 3\nopt:\n  lr: 3.0e-4\n")
  (tmp_path / "bad.yaml").write_text("model:\n  num_layerz: 3\n")
  return tmp_path


def test_defaults_and_overrides():
  cfg = parse_config(Cfg, ["out=/tmp/run", "model.num_layers=4", "opt.lr=1e-2", "use_bf16=true"])
  assert cfg.out == "/tmp/run"
  assert cfg.model.num_layers == 4 and cfg.model.hidden == 64
  assert cfg.opt.lr == pytest.approx(0.01) and isinstance(cfg.opt.lr, float)
  assert cfg.use_bf16 is True
  assert cfg.opt.betas == (0.9, 0.95)


def test_preset_then_overrides_in_order(presets):
  # preset is applied first wherever it appears; later items override it
  cfg = parse_config(Cfg, ["opt.lr=1", "preset=small", "steps=7"], presets_dir=presets)
  assert cfg.steps == 7
  assert cfg.model.num_layers == 3
  assert cfg.opt.lr == 1.0  # int accepted for float, converted
  assert isinstance(cfg.opt.lr, float)


def test_unknown_key_is_error_naming_key_and_valid_keys(presets):
  with pytest.raises(ConfigError, match=r"model\.num_layerz.*num_layers"):
    parse_config(Cfg, ["model.num_layerz=3"])
  with pytest.raises(ConfigError, match=r"'bogus'.*out"):
    parse_config(Cfg, ["bogus=1"])
  with pytest.raises(ConfigError, match=r"num_layerz"):
    parse_config(Cfg, ["preset=bad"], presets_dir=presets)
  with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*small"):
    parse_config(Cfg, ["preset=nope"], presets_dir=presets)


def test_type_errors():
  with pytest.raises(ConfigError, match="steps.*int"):
    parse_config(Cfg, ["steps=1.5"])
  with pytest.raises(ConfigError, match="use_bf16.*bool"):
    parse_config(Cfg, ["use_bf16=3"])
  with pytest.raises(ConfigError, match="schedule"):
    parse_config(Cfg, ["opt.schedule=linear"])
  with pytest.raises(ConfigError, match="betas"):
    parse_config(Cfg, ["opt.betas=[1, 2, 3]"])
  with pytest.raises(ConfigError, match="key=value"):
    parse_config(Cfg, ["steps"])


def test_strings_keep_raw_text_and_optional_fields():
  cfg = parse_config(Cfg, ["out=007", "tag=null", "steps=1e3"])
  assert cfg.out == "007" and cfg.tag is None and cfg.steps == 1000
  cfg = parse_config(Cfg, ["tag=abc", "opt.betas=[0.8, 0.9]"])
  assert cfg.tag == "abc" and cfg.opt.betas == (0.8, 0.9)


def test_optional_nested_dataclass_built_from_defaults():
  cfg = parse_config(Cfg, ["model.quant.bits=2"])
  assert cfg.model.quant == Quant(bits=2, method="quest")
  assert parse_config(Cfg, []).model.quant is None


def test_round_trip_dict():
  cfg = parse_config(Cfg, ["model.quant.bits=3", "opt.lr=2e-4", "tag=t"])
  d = config_to_dict(cfg)
  assert d["opt"]["betas"] == [0.9, 0.95]
  assert config_from_dict(Cfg, d) == cfg
  with pytest.raises(ConfigError, match="nope"):
    config_from_dict(Cfg, {"nope": 1})
