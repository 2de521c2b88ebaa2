"""Checkpoint readers: map each of our parameters to a tensor in a HF or google-deepmind file.

A reader is a function `tensor(path) -> np.ndarray` returning one parameter, already in our
layout (see `gemma.py`), so the loader can place parameters on the mesh one at a time and
never hold the whole model twice.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable

import numpy as np

from scope_jax.models.config import GemmaConfig, from_hf_dict

ParamPath = tuple
Reader = Callable[[ParamPath], np.ndarray]

_HF_NORMS = {
  "pre_attn_norm": "input_layernorm",
  "post_attn_norm": "post_attention_layernorm",
  "pre_ffw_norm": "pre_feedforward_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
}
_DM_NORMS = {
  "pre_attn_norm": "pre_attention_norm",
  "post_attn_norm": "post_attention_norm",
  "pre_ffw_norm": "pre_ffw_norm",
  "post_ffw_norm": "post_ffw_norm",
}


def by_part(
  embed: Callable[[], np.ndarray],
  final_norm: Callable[[], np.ndarray],
  layer_norm: Callable[[int, str], np.ndarray],
  layer: Callable[[int, list[str]], np.ndarray | None],
) -> Reader:
  """A reader from a file layout's four kinds of tensor: the embedding, the final norm's scale,
  layer `i`'s norm scale `name` (a key of `_HF_NORMS`) and layer `i`'s other parameter `rest`
  (e.g. `["attn", "q"]`; None when the layout has no such name)."""

  def tensor(path: ParamPath) -> np.ndarray:
    if path == ("embed",):
      return embed()
    if path == ("final_norm", "scale"):
      return final_norm()
    _, i, *rest = path
    if len(rest) == 2 and rest[0] in _HF_NORMS and rest[1] == "scale":
      return layer_norm(i, rest[0])
    found = layer(i, rest)
    if found is None:
      raise KeyError(path)
    return found

  return tensor


def checked_shape(source: str, key: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{source}: tensor {key!r} has shape {tuple(x.shape)}, expected {tuple(shape)}")
  return x


# --------------------------------------------------------------------------- Hugging Face


def read_hf_config(directory: str) -> GemmaConfig:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    return from_hf_dict(json.load(f), source=path)


def hf_reader(directory: str, config: GemmaConfig) -> Reader:
  """Reads `*.safetensors` in `directory` (one file or sharded) tensor by tensor."""
  from safetensors import safe_open

  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{directory}: no *.safetensors files")
  where: dict[str, str] = {}
  for file in files:
    with safe_open(file, framework="flax") as f:
      where.update({k: file for k in f.keys()})
  embed_keys = [k for k in where if k.endswith("embed_tokens.weight")]
  if not embed_keys:
    raise ValueError(f"{directory}: tensor 'model.embed_tokens.weight' is missing")
  prefix = embed_keys[0][: -len("embed_tokens.weight")]  # "model." or a multimodal prefix

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = prefix + name
    if key not in where:
      raise ValueError(f"{directory}: tensor {key!r} is missing (expected shape {shape})")
    with safe_open(where[key], framework="flax") as f:
      return checked_shape(directory, key, np.asarray(f.get_tensor(key)), shape)

  return hf_layout_reader(get, config)


def hf_layout_reader(get: Callable[[str, tuple[int, ...]], np.ndarray], config: GemmaConfig) -> Reader:
  """Our parameters from tensors named and shaped as in HF Gemma (`get(name, shape)`,
  names without the `model.` prefix). GGUF files use the same layout under other names."""
  c = config
  D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff

  def layer(i: int, rest: list[str]) -> np.ndarray | None:
    p = f"layers.{i}."
    match rest:
      case ["attn", "q"]:
        return get(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H)
      case ["attn", ("k" | "v") as kv]:
        return get(p + f"self_attn.{kv}_proj.weight", (K * H, D)).T.reshape(D, K, H)
      case ["attn", "o"]:
        return get(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D)
      case ["attn", ("q_norm" | "k_norm") as norm, "scale"]:
        return get(p + f"self_attn.{norm}.weight", (H,))
      case ["mlp", ("gate" | "up") as proj]:
        return get(p + f"mlp.{proj}_proj.weight", (F, D)).T
      case ["mlp", "down"]:
        return get(p + "mlp.down_proj.weight", (D, F)).T
    return None

  return by_part(
    embed=lambda: get("embed_tokens.weight", (c.vocab_size, D)),
    final_norm=lambda: get("norm.weight", (D,)),
    layer_norm=lambda i, norm: get(f"layers.{i}.{_HF_NORMS[norm]}.weight", (D,)),
    layer=layer,
  )


# --------------------------------------------------------------------------- google-deepmind/gemma


def is_orbax_checkpoint(directory: str) -> bool:
  return os.path.isdir(directory) and any(
    os.path.exists(os.path.join(directory, name)) for name in ("_METADATA", "manifest.ocdbt", "checkpoint")
  )


def read_orbax_params(directory: str) -> dict[str, np.ndarray]:
  """Restores a google-deepmind/gemma checkpoint as {'transformer/layer_0/attn/q_einsum/w': array}.

  Checkpoints store keys either nested or flat (`'transformer/layer_0/attn/q_einsum': {'w': ..}`);
  both flatten to the same '/'-joined names.
  """
  import orbax.checkpoint as ocp

  tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(directory))
  flat = {}

  def walk(prefix: str, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      flat[prefix] = np.asarray(node)

  walk("", tree)
  return flat


def config_from_orbax_shapes(params: dict[str, np.ndarray], source: str) -> GemmaConfig:
  """Matches a checkpoint's shapes to a Gemma 2 preset (the checkpoints carry no config)."""
  from scope_jax.models.config import PRESETS

  n_layers = len({k.split("/")[1] for k in params if k.startswith("transformer/layer_")})
  d_model = params["transformer/embedder/input_embedding"].shape[1]
  for preset in PRESETS.values():
    if (preset.d_model, preset.n_layers) == (d_model, n_layers):
      return preset
  raise ValueError(
    f"{source}: d_model={d_model}, {n_layers} layers matches no preset "
    f"({', '.join(PRESETS)}); pass config= to load_model"
  )


def orbax_reader(params: dict[str, np.ndarray], config: GemmaConfig, source: str) -> Reader:
  c = config
  D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff

  def get(key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in params:
      raise ValueError(f"{source}: parameter {key!r} is missing" + (f" (expected shape {shape})" if shape else ""))
    return params[key] if shape is None else checked_shape(source, key, params[key], shape)

  def embed() -> np.ndarray:
    table = get("transformer/embedder/input_embedding")
    if table.ndim != 2 or table.shape[0] < c.vocab_size or table.shape[1] != D:
      raise ValueError(f"{source}: embedding has shape {table.shape}, expected ({c.vocab_size}+, {D})")
    return table[: c.vocab_size]  # Flax tables carry padding rows (256,128 for 256,000)

  def layer(i: int, rest: list[str]) -> np.ndarray | None:
    p = f"transformer/layer_{i}/"
    match rest:
      case ["attn", "q"]:
        return get(p + "attn/q_einsum/w", (N, D, H)).transpose(1, 0, 2)
      case ["attn", ("k" | "v") as kv]:
        return get(p + "attn/kv_einsum/w", (2, K, D, H))[0 if kv == "k" else 1].transpose(1, 0, 2)
      case ["attn", "o"]:
        return get(p + "attn/attn_vec_einsum/w", (N, H, D))
      case ["attn", ("q_norm" | "k_norm") as norm, "scale"]:
        return get(p + ("attn/_query_norm/scale" if norm == "q_norm" else "attn/_key_norm/scale"), (H,))
      case ["mlp", ("gate" | "up") as proj]:
        w = get(p + "mlp/gating_einsum/w")
        index = 0 if proj == "gate" else 1
        if w.shape == (2, F, D):  # 9B / 27B layout
          return w[index].T
        return checked_shape(source, p + "mlp/gating_einsum/w", w, (2, D, F))[index]  # 2B layout
      case ["mlp", "down"]:
        return get(p + "mlp/linear/w", (F, D))
    return None

  return by_part(
    embed,
    final_norm=lambda: get("transformer/final_norm/scale", (D,)),
    layer_norm=lambda i, norm: get(f"transformer/layer_{i}/{_DM_NORMS[norm]}/scale", (D,)),
    layer=layer,
  )
