"""Activation sites (docs/recipe.md §4): `KIND.LAYER` names and their validation."""

from __future__ import annotations

from typing import NamedTuple

from scope_jax.models.config import GemmaConfig

SITE_KINDS = ("att", "mlp", "res", "mlp_in")


class Site(NamedTuple):
  kind: str
  layer: int

  @property
  def name(self) -> str:
    return f"{self.kind}.{self.layer}"


def parse_site(name: str, config: GemmaConfig | None = None) -> Site:
  """`"res.12"` -> Site("res", 12), checked against the model's depth when `config` is given."""
  kind, _, layer = str(name).partition(".")
  if kind not in SITE_KINDS or not layer.isdigit():
    raise ValueError(f"site {name!r} is not of the form KIND.LAYER with KIND in {SITE_KINDS}")
  if config is not None and int(layer) >= config.n_layers:
    raise ValueError(f"site {name!r}: layer {layer} is beyond the last layer ({config.n_layers - 1})")
  return Site(kind, int(layer))


def site_width(site: Site, config: GemmaConfig) -> int:
  return config.attn_width if site.kind == "att" else config.d_model
