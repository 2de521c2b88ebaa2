"""The per-layer transcoder suite of the embedded Gemma 3 270M, the way Gemma Scope trains one
(the report's Appendix B): a transcoder mlp_in.L -> mlp.L at every layer, all read from one store
that one forward writes (`grid.extract_by = "all"`), one trainer job (train, export, eval) per layer.

    scope-jax sweep --config configs/transcoder_suite.py --workdir runs/suite

Everything else is `configs/local.py:kind=clt`'s (same text, holdout, token budget, widths, λ,
recipe, store format and site order), so the suite's store is the CLT's: the CLT run reuses it with
`--config.extract.store=runs/suite/stores/all-400K` and the two are compared on the same rows
(benchmarks/README.md). The circuit-tracer transcoder set of the suite:

    scope-jax transcoder-set runs/suite/train/transcoder.*/export/index.json --out runs/suite/circuit_tracer

Arguments: those of configs/local.py (`layers=A-B`, `tokens`, `widths`, `l1`).
"""

import importlib.util
from pathlib import Path


def local_config(arg: str):
  """configs/local.py's config (loaded from beside this file, wherever the command runs)."""
  spec = importlib.util.spec_from_file_location("scope_jax_configs_local", Path(__file__).with_name("local.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = local_config(f"kind=clt,{arg}" if arg else "kind=clt")
  layers = tuple(range(c.clt.first_layer, c.clt.last_layer + 1))
  c.kind, c.site = "sae", None  # each job sets its own (grid.py)
  c.grid.layers, c.grid.kinds, c.grid.transcoders = layers, (), ("transcoder",)
  c.grid.transcoder_widths = tuple(c.sweep.widths)
  c.grid.extract_by = "all"
  c.train.log_every = 50
  return c
