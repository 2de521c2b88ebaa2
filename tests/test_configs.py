"""The config files load, with the values their docs promise."""

import importlib.util
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_local_config():
  c = load("local")
  assert c.model == "gemma3-270m" and c.sites == ("res.6",) and c.site == "res.6"
  assert len(c.sweep.widths) >= 2 and len(c.sweep.l1_coefficients) >= 3 and c.data.holdout_every > 0
  assert load("local", "tokens=100,steps=5,widths=64+128").sweep.widths == (64, 128)
  with pytest.raises(ValueError, match="config argument 'stpes'"):
    load("local", "stpes=5")


@pytest.mark.parametrize(
  "size, widths, tokens",
  [
    ("2b", (16_384, 65_536), 8_000_000_000),
    ("9b", (16_384, 131_072), 8_000_000_000),
    ("27b", (131_072,), 8_000_000_000),
  ],
)
def test_gemma2_presets(size, widths, tokens):
  c = load("gemma2", f"size={size},layer=10,kind=mlp")
  assert c.sweep.widths == widths and c.extract.tokens == tokens and c.sites == ("mlp.10",)
  assert c.train.batch_size == 4_096 and c.train.steps * 4_096 == tokens
  assert load("gemma2", f"size={size},widths=16384").extract.tokens == 4_000_000_000


def test_gemma2_preset_bad_arguments():
  with pytest.raises(ValueError, match="size '3b'"):
    load("gemma2", "size=3b")
  with pytest.raises(ValueError, match="layer 30: Gemma 2 2b has layers 0..25"):
    load("gemma2", "size=2b,layer=30")
