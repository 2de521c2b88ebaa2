"""A CLT's files (docs/recipe.md §14), in the two layouts the tools read:

- **circuit-tracer** (`save_circuit_tracer`): a directory with `config.yaml` (`model_kind:
  cross_layer_transcoder`, hooks `mlp.hook_in` → `hook_mlp_out`) and per layer i
  `W_enc_{i}.safetensors` (`W_enc_i [F, d]`, `b_enc_i`, `b_dec_i`, `threshold_i`) and
  `W_dec_{i}.safetensors` (`W_dec_i [F, n_layers - i, d]`): what `circuit_tracer`'s `load_clt`
  reads. It spans the model's layers from 0 (circuit-tracer replaces every MLP).
- **Gemma Scope 2** (`save_gemma_scope_2_clt`): `params_layer_{i}.safetensors` per layer with
  `w_enc [d, F]`, `b_enc`, `threshold`, `b_dec` (layer i's target bias) and `w_dec [F, n_layers, d]`
  (zero for the layers before i), beside a `config.json`; SAELens's Gemma 3 loader reads each
  layer's file (as a transcoder whose decoders are summed), circuit-tracer's `load_gemma_scope_2_clt`
  the set.

`load_clt` reads either back, checking every shape against the layer count and naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from scope_jax.sae.clt import CLT, CLTInfo, check_shapes
from scope_jax.sae.io import save_file

CIRCUIT_TRACER_CONFIG = "config.yaml"
GEMMA_SCOPE_2_CONFIG = "config.json"
HF_MODEL_NAMES = {"gemma3-270m": "google/gemma-3-270m"}


def _np(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32))


def save_circuit_tracer(clt: CLT, info: CLTInfo, path: str | Path) -> Path:
  """circuit-tracer's CLT directory at `path` (a new directory, or one this function wrote)."""
  path = Path(path)
  check_shapes(clt, str(path))
  if info.first_layer != 0:
    raise ValueError(
      f"{path}: circuit-tracer replaces every MLP of the model from layer 0; this CLT starts at layer "
      f"{info.first_layer} (train it over clt.first_layer = 0 … the last layer)"
    )
  path.mkdir(parents=True, exist_ok=True)
  for i in range(clt.layers):
    encoder = {
      f"W_enc_{i}": _np(clt.W_enc[i]).T.copy(),
      f"b_enc_{i}": _np(clt.b_enc[i]),
      f"b_dec_{i}": _np(clt.b_dec[i]),
      f"threshold_{i}": _np(clt.threshold[i]),
    }
    save_file(encoder, str(path / f"W_enc_{i}.safetensors"))
    save_file({f"W_dec_{i}": _np(clt.W_dec[i])}, str(path / f"W_dec_{i}.safetensors"))
  config = {
    "model_kind": "cross_layer_transcoder",
    "model_name": HF_MODEL_NAMES.get(info.model, info.model),
    "feature_input_hook": "mlp.hook_in",
    "feature_output_hook": "hook_mlp_out",
    "scan": f"scope_jax/{path.name}",
    "scope_jax": {"model": info.model, "first_layer": info.first_layer, "l1_coefficient": info.l1_coefficient},
  }
  (path / CIRCUIT_TRACER_CONFIG).write_text(_yaml(config))
  return path


def _yaml(config: dict) -> str:
  """The flat YAML circuit-tracer's config needs (strings quoted as JSON, which YAML reads)."""
  lines = []
  for key, value in config.items():
    if isinstance(value, dict):
      lines.append(f"{key}:")
      lines += [f"  {k}: {json.dumps(v)}" for k, v in value.items()]
    else:
      lines.append(f"{key}: {json.dumps(value)}")
  return "\n".join(lines) + "\n"


def save_gemma_scope_2_clt(clt: CLT, info: CLTInfo, path: str | Path) -> Path:
  """Gemma Scope 2's CLT layout at `path`: `params_layer_{i}.safetensors` and `config.json`."""
  path = Path(path)
  check_shapes(clt, str(path))
  path.mkdir(parents=True, exist_ok=True)
  L, F, d = clt.layers, clt.width, clt.d_out
  for i in range(L):
    w_dec = np.zeros((F, L, d), np.float32)
    w_dec[:, i:] = _np(clt.W_dec[i])
    params = {
      "w_enc": _np(clt.W_enc[i]),
      "b_enc": _np(clt.b_enc[i]),
      "threshold": _np(clt.threshold[i]),
      "b_dec": _np(clt.b_dec[i]),
      "w_dec": w_dec,
    }
    save_file(params, str(path / f"params_layer_{info.first_layer + i}.safetensors"))
  config = {
    "architecture": "jump_relu",
    "model_name": HF_MODEL_NAMES.get(info.model, info.model),
    "affine_connection": False,
    "layers": info.model_layers,
    "scope_jax": {"model": info.model, "first_layer": info.first_layer, "l1_coefficient": info.l1_coefficient},
  }
  (path / GEMMA_SCOPE_2_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return path


def save_transcoder_set(saes: list, model: str, path: str | Path) -> Path:
  """circuit-tracer's transcoder set at `path` from released transcoders (sae/model.py `SAE`) of
  layers 0, 1, … in order: `layer_{i}.safetensors` (`W_enc [F, d]`, `W_dec [F, d]`, `b_enc`,
  `b_dec`, `activation_function.threshold`, `W_skip` for a skip-transcoder) and `config.yaml`
  (`model_kind: transcoder_set`, the files listed by absolute path)."""
  path = Path(path).absolute()
  for i, sae in enumerate(saes):
    expected = (f"mlp_in.{i}", f"mlp.{i}")
    if (sae.info.site, sae.info.target_site) != expected:
      raise ValueError(
        f"{path}: transcoder {i} reads {sae.info.site} and writes {sae.info.target_site}; a transcoder set needs "
        f"{expected[0]} -> {expected[1]} at every layer from 0, in order"
      )
  path.mkdir(parents=True, exist_ok=True)
  files = []
  for i, sae in enumerate(saes):
    params = {
      "W_enc": _np(sae.W_enc).T.copy(),
      "W_dec": _np(sae.W_dec),
      "b_enc": _np(sae.b_enc),
      "b_dec": _np(sae.b_dec),
      "activation_function.threshold": _np(sae.threshold),
    }
    if sae.W_skip is not None:
      params["W_skip"] = _np(sae.W_skip).T.copy()  # circuit-tracer applies x @ W_skip.T
    save_file(params, str(path / f"layer_{i}.safetensors"))
    files.append(str(path / f"layer_{i}.safetensors"))
  config = {
    "model_kind": "transcoder_set",
    "model_name": HF_MODEL_NAMES.get(model, model),
    "feature_input_hook": "mlp.hook_in",
    "feature_output_hook": "hook_mlp_out",
    "scan": f"scope_jax/{path.name}",
  }
  text = _yaml(config) + "transcoders:\n" + "".join(f"  - {json.dumps(f)}\n" for f in files)
  (path / CIRCUIT_TRACER_CONFIG).write_text(text)
  return path


def load_transcoder_set(path: str | Path) -> tuple[CLT, CLTInfo]:
  """A transcoder set (circuit-tracer's layout) as a CLT whose latents write to their own layer
  only (`W_dec[i] [F, 1, d]`): what the replacement-model evaluation reads (eval/replacement.py)."""
  import yaml
  from safetensors.numpy import load_file

  path = Path(path)
  config = yaml.safe_load((path / CIRCUIT_TRACER_CONFIG).read_text())
  layers = _numbered(path, r"layer_(\d+)\.safetensors")
  if not layers or layers != list(range(len(layers))):
    raise ValueError(f"{path}: transcoder files for layers {layers}; expected layer_0 … layer_{{n-1}}.safetensors")
  params = [load_file(path / f"layer_{i}.safetensors") for i in layers]
  for i, p in enumerate(params):
    if "W_skip" in p:
      raise ValueError(
        f"{path / f'layer_{i}.safetensors'}: a skip-transcoder; the replacement evaluation reads plain ones"
      )
    if p["W_enc"].shape != params[0]["W_enc"].shape:
      raise ValueError(
        f"{path / f'layer_{i}.safetensors'}: W_enc {p['W_enc'].shape}, layer 0's {params[0]['W_enc'].shape}; "
        "a set read as one CLT needs one width"
      )
  clt = CLT(
    W_enc=np.stack([p["W_enc"].T for p in params]),
    b_enc=np.stack([p["b_enc"] for p in params]),
    threshold=np.stack([p["activation_function.threshold"] for p in params]),
    W_dec=tuple(p["W_dec"][:, None, :] for p in params),
    b_dec=np.stack([p["b_dec"] for p in params]),
  )
  return clt, CLTInfo(config.get("model_name", ""), 0, len(layers))


def load_replacement(path: str | Path) -> tuple[CLT, CLTInfo, str]:
  """A CLT (either layout) or a transcoder set: (its CLT form, info, "clt" or "transcoder_set")."""
  import yaml

  path = Path(path)
  config_file = path / CIRCUIT_TRACER_CONFIG
  if config_file.exists() and yaml.safe_load(config_file.read_text()).get("model_kind") == "transcoder_set":
    return (*load_transcoder_set(path), "transcoder_set")
  return (*load_clt(path), "clt")


def load_clt(path: str | Path) -> tuple[CLT, CLTInfo]:
  """A CLT directory in either layout (float32 arrays); a missing file, a wrong layer count or a
  decoder of the wrong shape is a ValueError naming the file."""
  from safetensors.numpy import load_file

  path = Path(path)
  if (path / CIRCUIT_TRACER_CONFIG).exists():
    return _load_circuit_tracer(path, load_file)
  if (path / GEMMA_SCOPE_2_CONFIG).exists() or list(path.glob("params_layer_*.safetensors")):
    return _load_gemma_scope_2(path, load_file)
  raise ValueError(f"{path}: not a CLT directory (neither circuit-tracer's config.yaml nor params_layer_*.safetensors)")


def _numbered(path: Path, pattern: str) -> list[int]:
  return sorted(int(m.group(1)) for p in path.iterdir() if (m := re.fullmatch(pattern, p.name)))


def _load_circuit_tracer(path: Path, load_file) -> tuple[CLT, CLTInfo]:
  import yaml

  config = yaml.safe_load((path / CIRCUIT_TRACER_CONFIG).read_text())
  if config.get("model_kind") != "cross_layer_transcoder":
    raise ValueError(
      f"{path / CIRCUIT_TRACER_CONFIG}: model_kind {config.get('model_kind')!r}; expected 'cross_layer_transcoder'"
    )
  layers = _numbered(path, r"W_enc_(\d+)\.safetensors")
  if layers != list(range(len(layers))) or not layers:
    raise ValueError(f"{path}: W_enc files for layers {layers}; expected W_enc_0 … W_enc_{{n-1}}.safetensors")
  enc, dec = [], []
  for i in layers:
    dec_file = path / f"W_dec_{i}.safetensors"
    if not dec_file.exists():
      raise ValueError(f"{dec_file}: missing (the decoders of layer {i})")
    enc.append(load_file(path / f"W_enc_{i}.safetensors"))
    w = load_file(dec_file).get(f"W_dec_{i}")
    if w is None or w.ndim != 3 or w.shape[1] != len(layers) - i:
      shape = None if w is None else tuple(w.shape)
      raise ValueError(
        f"{dec_file}: W_dec_{i} has shape {shape}; expected [d_sae, {len(layers) - i}, d_model] for layer {i} of "
        f"{len(layers)} (one row per later layer)"
      )
    dec.append(w)
  clt = CLT(
    W_enc=np.stack([e[f"W_enc_{i}"].T for i, e in enumerate(enc)]),
    b_enc=np.stack([e[f"b_enc_{i}"] for i, e in enumerate(enc)]),
    threshold=np.stack([e.get(f"threshold_{i}", np.zeros_like(e[f"b_enc_{i}"])) for i, e in enumerate(enc)]),
    W_dec=tuple(dec),
    b_dec=np.stack([e[f"b_dec_{i}"] for i, e in enumerate(enc)]),
  )
  check_shapes(clt, str(path))
  ours = config.get("scope_jax") or {}
  info = CLTInfo(ours.get("model", config.get("model_name", "")), 0, len(layers), ours.get("l1_coefficient", 0.0))
  return clt, info


def _load_gemma_scope_2(path: Path, load_file) -> tuple[CLT, CLTInfo]:
  layers = _numbered(path, r"params_layer_(\d+)\.safetensors")
  first = layers[0] if layers else 0
  if not layers or layers != list(range(first, first + len(layers))):
    raise ValueError(f"{path}: params_layer files for layers {layers}; expected consecutive layers")
  config = json.loads((path / GEMMA_SCOPE_2_CONFIG).read_text()) if (path / GEMMA_SCOPE_2_CONFIG).exists() else {}
  params = [load_file(path / f"params_layer_{layer}.safetensors") for layer in layers]
  n = len(layers)
  for layer, p in zip(layers, params):
    shape = tuple(p["w_dec"].shape)
    if len(shape) != 3 or shape[1] != n:
      raise ValueError(
        f"{path / f'params_layer_{layer}.safetensors'}: w_dec has shape {shape}; expected [d_sae, {n}, d_model] "
        f"({n} layers in {path})"
      )
  clt = CLT(
    W_enc=np.stack([p["w_enc"] for p in params]),
    b_enc=np.stack([p["b_enc"] for p in params]),
    threshold=np.stack([p["threshold"] for p in params]),
    W_dec=tuple(p["w_dec"][:, i:] for i, p in enumerate(params)),
    b_dec=np.stack([p["b_dec"] for p in params]),
  )
  check_shapes(clt, str(path))
  ours = config.get("scope_jax") or {}
  info = CLTInfo(ours.get("model", config.get("model_name", "")), first, n, ours.get("l1_coefficient", 0.0))
  return clt, info
