"""Gemma 2 / Gemma 3 hyper-parameters: one dataclass, presets, and readers for HF configs.

Every architectural constant the forward pass uses lives here and comes from the loaded
checkpoint's config; the model code never hard-codes a Gemma value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"
MODEL_TYPES = ("gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Architecture of a Gemma 2 or Gemma 3 text decoder."""

  model_type: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  query_pre_attn_scalar: float
  layer_types: tuple[str, ...]
  sliding_window: int | None
  rope_theta_global: float
  rope_theta_local: float
  # Linear RoPE scaling ("linear" rope type): positions are divided by this factor.
  rope_scale_global: float = 1.0
  rope_scale_local: float = 1.0
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  qk_norm: bool = False
  rms_norm_eps: float = 1e-6
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
    if len(self.layer_types) != self.n_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries but the model has {self.n_layers} layers")
    unknown = set(self.layer_types) - {SLIDING, GLOBAL}
    if unknown:
      raise ValueError(f"layer_types contains {sorted(unknown)}; expected {SLIDING!r} or {GLOBAL!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  @property
  def attn_width(self) -> int:
    """Width of the `att.L` site: concatenated per-head outputs."""
    return self.n_heads * self.head_dim

  def replace(self, **changes: Any) -> GemmaConfig:
    return dataclasses.replace(self, **changes)


def alternating_layer_types(n_layers: int, pattern: int) -> tuple[str, ...]:
  """`pattern - 1` sliding layers, then one global layer, repeated (Gemma 2: 2, Gemma 3: 6)."""
  return tuple(GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


def _gemma2(d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, query_pre_attn_scalar):
  return GemmaConfig(
    model_type="gemma2",
    vocab_size=256_000,
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=n_kv_heads,
    head_dim=head_dim,
    d_ff=d_ff,
    query_pre_attn_scalar=query_pre_attn_scalar,
    layer_types=alternating_layer_types(n_layers, 2),
    sliding_window=4096,
    rope_theta_global=10_000.0,
    rope_theta_local=10_000.0,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
  )


PRESETS: dict[str, GemmaConfig] = {
  "gemma2-2b": _gemma2(2304, 26, 8, 4, 256, 9216, 256),
  "gemma2-9b": _gemma2(3584, 42, 16, 8, 256, 14336, 256),
  "gemma2-27b": _gemma2(4608, 46, 32, 16, 128, 36864, 144),
  "gemma3-270m": GemmaConfig(
    model_type="gemma3_text",
    vocab_size=262_144,
    d_model=640,
    n_layers=18,
    n_heads=4,
    n_kv_heads=1,
    head_dim=256,
    d_ff=2048,
    query_pre_attn_scalar=256,
    layer_types=alternating_layer_types(18, 6),
    sliding_window=512,
    rope_theta_global=1_000_000.0,
    rope_theta_local=10_000.0,
    qk_norm=True,
  ),
}


def _rope_from_hf(hf: dict[str, Any], layer_type: str) -> tuple[float, float]:
  """(theta, linear scale) for one layer kind from an HF config, old or new style."""
  params = hf.get("rope_parameters")
  if params and layer_type in params:  # transformers >= 5, Gemma 3: per layer kind
    params = params[layer_type]
  if params is None:  # older configs: rope_theta / rope_local_base_freq / rope_scaling
    theta_key = "rope_local_base_freq" if (layer_type == SLIDING and "rope_local_base_freq" in hf) else "rope_theta"
    params = {"rope_theta": hf.get(theta_key, 10_000.0)}
    if layer_type == GLOBAL and hf.get("rope_scaling"):
      params.update(hf["rope_scaling"])
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "linear"):
    raise ValueError(f"rope type {rope_type!r} is not supported; expected 'default' or 'linear'")
  scale = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
  return float(params.get("rope_theta", 10_000.0)), scale


def from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> GemmaConfig:
  """Builds a GemmaConfig from a Hugging Face `config.json` (model_type gemma2 or gemma3_text)."""
  model_type = hf.get("model_type")
  if model_type == "gemma3" and "text_config" in hf:
    hf = {**hf["text_config"], "model_type": "gemma3_text"}
    model_type = "gemma3_text"
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
  gemma3 = model_type == "gemma3_text"
  try:
    n_layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or alternating_layer_types(
      n_layers, int(hf.get("sliding_window_pattern", 6 if gemma3 else 2))
    )
    theta_global, scale_global = _rope_from_hf(hf, GLOBAL)
    theta_local, scale_local = _rope_from_hf(hf, SLIDING)
    default_softcaps = (None, None) if gemma3 else (50.0, 30.0)
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
      raise ValueError(f"{source}: hidden_activation {activation!r} is not supported; expected 'gelu_pytorch_tanh'")
    if not hf.get("tie_word_embeddings", True):
      raise ValueError(f"{source}: untied embeddings are not supported (tie_word_embeddings must be true)")
    eos = hf.get("eos_token_id", 1)
    return GemmaConfig(
      model_type=model_type,
      vocab_size=int(hf["vocab_size"]),
      d_model=int(hf["hidden_size"]),
      n_layers=n_layers,
      n_heads=int(hf["num_attention_heads"]),
      n_kv_heads=int(hf.get("num_key_value_heads", hf["num_attention_heads"])),
      head_dim=int(hf.get("head_dim", 256)),
      d_ff=int(hf["intermediate_size"]),
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      layer_types=tuple(layer_types),
      sliding_window=hf.get("sliding_window", 4096),
      rope_theta_global=theta_global,
      rope_theta_local=theta_local,
      rope_scale_global=scale_global,
      rope_scale_local=scale_local,
      attn_logit_softcap=hf.get("attn_logit_softcapping", default_softcaps[0]),
      final_logit_softcap=hf.get("final_logit_softcapping", default_softcaps[1]),
      qk_norm=gemma3,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      bos_id=int(hf.get("bos_token_id", 2)),
      eos_id=int(eos[0] if isinstance(eos, list) else eos),
      pad_id=int(hf.get("pad_token_id", 0) or 0),
    )
  except KeyError as e:
    raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
