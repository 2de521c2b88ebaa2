"""The README's main job: `scope-jax demo` on the embedded Gemma 3 270M."""

import re

from scope_jax import cli


def test_demo_generates_and_reports_sites(capsys):
  cli.main(["demo", "--prompt", "The capital of France is", "--max-new-tokens", "3", "--sites", "res.3,att.0"])
  out = capsys.readouterr().out
  assert "gemma3_text, d_model=640, 18 layers" in out
  assert "The capital of France is\033[1m" in out
  assert re.search(r"res\.3\s+\(1, \d+, 640\)", out)
  assert re.search(r"att\.0\s+\(1, \d+, 1024\)", out)
