"""Reading and writing SAEs: Gemma Scope `params.npz` and SAELens directories (docs/recipe.md §7).

    sae = load_sae("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz")
    sae = load_sae("exports/saelens/res.6-w4096-l0.001")     # cfg.json + sae_weights.safetensors
    save_sae(sae, "out/params.npz", format="gemma-scope")
    save_sae(sae, "out/my_sae", format="saelens", sparsity_log10=density)

Files hold the released form (raw inputs, no pre-encoder bias). A SAELens file trained with
`apply_b_dec_to_input` is converted on load; input normalizations it cannot express are refused.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from scope_jax.layout import replace_directory
from scope_jax.models.sites import parse_site
from scope_jax.sae.model import PARAM_NAMES, SAE, SAEInfo

FORMATS = ("gemma-scope", "saelens")
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write; older versions are read as pre-v6 configs

# our site kind -> TransformerLens/SAELens hook name template
HOOK_NAMES = {
  "res": "blocks.{layer}.hook_resid_post",
  "mlp": "blocks.{layer}.hook_mlp_out",
  "att": "blocks.{layer}.attn.hook_z",
  "mlp_in": "blocks.{layer}.ln2.hook_normalized",
}
_HOOK_PATTERNS = {
  kind: re.compile("^" + re.escape(t).replace(r"\{layer\}", r"(\d+)") + "$") for kind, t in HOOK_NAMES.items()
}
_SAELENS_WEIGHTS, _SAELENS_CFG, _SAELENS_SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"


def hook_name(site: str) -> str:
  s = parse_site(site)
  return HOOK_NAMES[s.kind].format(layer=s.layer)


def site_from_hook_name(name: str) -> str | None:
  for kind, pattern in _HOOK_PATTERNS.items():
    if m := pattern.match(name or ""):
      return f"{kind}.{m.group(1)}"
  return None


def width_name(width: int) -> str:
  """Gemma Scope's folder name for a width: 16384 -> '16k', 131072 -> '131k', 2**20 -> '1m'."""
  if width >= 2**20 and width % 2**20 == 0:
    return f"{width // 2**20}m"
  return f"{width // 1000}k" if width >= 1000 else str(width)


def _site_from_path(path: Path) -> str | None:
  """`.../gemma-scope-2b-pt-res/layer_12/...` or `.../res/layer_12/...` -> 'res.12'."""
  parts = path.parts
  for i, part in enumerate(parts):
    m = re.fullmatch(r"layer_(\d+)", part)
    if m and i > 0:
      kind = re.search(r"(?:^|-)(mlp_in|res|mlp|att)s?$", parts[i - 1])
      if kind:
        return f"{kind.group(1)}.{m.group(1)}"
  return None


def _check_shapes(arrays: dict[str, np.ndarray], where: str) -> None:
  d, m = arrays["W_enc"].shape if arrays["W_enc"].ndim == 2 else (None, None)
  expected = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,), "threshold": (m,)}
  for k, shape in expected.items():
    if d is None or arrays[k].shape != shape:
      raise ValueError(
        f"{where}: {k} has shape {arrays[k].shape}; expected {shape} for W_enc {arrays['W_enc'].shape} = [d_in, width]"
      )


def _check_values(arrays: dict[str, np.ndarray], where: str) -> None:
  """Every weight finite and every threshold >= 0: what a JumpReLU SAE can hold."""
  for k in PARAM_NAMES:
    bad = int(np.size(arrays[k]) - np.count_nonzero(np.isfinite(arrays[k])))
    if bad:
      raise ValueError(f"{where}: {k} holds {bad} NaN or Inf values; expected finite weights")
  if negative := int(np.count_nonzero(arrays["threshold"] < 0)):
    raise ValueError(f"{where}: threshold holds {negative} negative values; expected thresholds >= 0")


def _from_arrays(arrays: dict[str, np.ndarray], info: SAEInfo, where: str) -> SAE:
  _check_shapes(arrays, where)
  _check_values(arrays, where)
  import jax.numpy as jnp

  return SAE(**{k: jnp.asarray(arrays[k], jnp.float32) for k in PARAM_NAMES}, info=info)


def _load_npz(path: Path, site: str | None) -> SAE:
  try:
    with np.load(path) as z:
      by_lower = {k.lower(): k for k in z.files}
      missing = [k for k in PARAM_NAMES if k.lower() not in by_lower]
      if missing:
        raise ValueError(
          f"{path}: missing {missing} (keys found: {sorted(z.files)}); a Gemma Scope "
          f"params.npz holds {list(PARAM_NAMES)} (upper- or lower-case)"
        )
      arrays = {k: z[by_lower[k.lower()]] for k in PARAM_NAMES}
  except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
    if str(path) in str(e):
      raise
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  return _from_arrays(arrays, SAEInfo(site=site or _site_from_path(path.resolve())), str(path))


def _load_saelens(path: Path, site: str | None) -> SAE:
  from safetensors.numpy import load_file

  try:
    cfg = json.loads((path / _SAELENS_CFG).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path / _SAELENS_CFG}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"{path / _SAELENS_CFG}: expected a JSON object, found {type(cfg).__name__}")
  if cfg.get("architecture") != "jumprelu":
    raise ValueError(
      f"{path / _SAELENS_CFG}: architecture {cfg.get('architecture')!r}; scope_jax reads 'jumprelu' SAEs only"
    )
  if cfg.get("normalize_activations", "none") not in ("none", None):
    raise ValueError(
      f"{path / _SAELENS_CFG}: normalize_activations={cfg['normalize_activations']!r}; "
      f"only 'none' can be loaded (fold the normalization into the weights first)"
    )
  try:
    arrays = load_file(path / _SAELENS_WEIGHTS)
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise ValueError(f"{path / _SAELENS_WEIGHTS}: not a readable safetensors file ({e})") from e
  missing = [k for k in PARAM_NAMES if k not in arrays]
  if missing:
    raise ValueError(f"{path / _SAELENS_WEIGHTS}: missing tensors {missing}")
  arrays = {k: arrays[k].astype(np.float32) for k in PARAM_NAMES}
  _check_shapes(arrays, str(path / _SAELENS_WEIGHTS))
  sizes = {"d_in": arrays["W_enc"].shape[0], "d_sae": arrays["W_enc"].shape[1]}
  for field, size in sizes.items():
    if field in cfg and cfg[field] != size:
      raise ValueError(f"{path / _SAELENS_CFG}: {field} = {cfg[field]!r}, but the weights have {field} {size}")
  if cfg.get("apply_b_dec_to_input", False):  # pre = (x - b_dec) W + b  ==  x W + (b - b_dec W)
    arrays["b_enc"] = arrays["b_enc"] - arrays["b_dec"] @ arrays["W_enc"]
  meta = cfg.get("metadata", {}) or {}
  info = SAEInfo(
    site=site or meta.get("scope_jax_site") or site_from_hook_name(meta.get("hook_name")),
    model=meta.get("model_name"),
    context_size=meta.get("context_size"),
    dataset=meta.get("dataset_path"),
    l1_coefficient=meta.get("l1_coefficient"),
  )
  return _from_arrays(arrays, info, str(path))


def load_sae(path: str | Path, site: str | None = None) -> SAE:
  """Reads an SAE from a Gemma Scope `params.npz` (or its folder) or a SAELens directory.

  `site` (e.g. "res.12") overrides what the file or path says about where the SAE belongs.
  """
  path = Path(path)
  if site is not None:
    parse_site(site)
  if path.is_dir() and (path / _SAELENS_CFG).exists():
    return _load_saelens(path, site)
  if path.is_dir() and (path / "params.npz").exists():
    path = path / "params.npz"
  if path.is_file() and path.suffix == ".npz":
    return _load_npz(path, site)
  raise FileNotFoundError(
    f"{path}: not an SAE; expected a Gemma Scope params.npz (or a folder "
    f"holding one) or a SAELens directory with {_SAELENS_CFG}"
  )


def save_sae(sae: SAE, path: str | Path, format: str = "gemma-scope", sparsity_log10: np.ndarray | None = None) -> Path:
  """Writes the released-form `sae`; returns the file (gemma-scope) or directory (saelens).

  gemma-scope: `path` is the `.npz` file, or a folder that receives `params.npz`.
  saelens: `path` is a directory; `sparsity_log10 [M]` (log10 firing density) is written
  to sparsity.safetensors when given.
  """
  if format not in FORMATS:
    raise ValueError(f"format {format!r}: expected one of {FORMATS}")
  if sae.W_enc.ndim != 2:
    raise ValueError(f"save_sae takes one SAE; got a stack of shape {sae.W_enc.shape} (use sae.model.unstack)")
  arrays = sae.numpy()
  path = Path(path)
  if format == "gemma-scope":
    if path.suffix != ".npz":
      path = path / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path
  from safetensors.numpy import save_file

  staging = path.with_name(path.name + ".partial")  # written whole, then swapped in
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  save_file(arrays, staging / _SAELENS_WEIGHTS)
  if sparsity_log10 is not None:
    save_file({"sparsity": np.asarray(sparsity_log10, np.float32)}, staging / _SAELENS_SPARSITY)
  info = sae.info
  cfg = {
    "architecture": "jumprelu",
    "d_in": sae.d_in,
    "d_sae": sae.width,
    "dtype": "float32",
    "device": "cpu",
    "apply_b_dec_to_input": False,
    "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": {
      "sae_lens_version": SAELENS_FORMAT_VERSION,
      "model_name": info.model,
      "hook_name": hook_name(info.site) if info.site else None,
      "hook_head_index": None,
      "context_size": info.context_size,
      "prepend_bos": True,
      "dataset_path": info.dataset,
      "exclude_special_tokens": True,
      "scope_jax_site": info.site,
      "l1_coefficient": info.l1_coefficient,
    },
  }
  (staging / _SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
  return replace_directory(staging, path)


__all__ = ["FORMATS", "hook_name", "load_sae", "save_sae", "site_from_hook_name", "width_name"]
