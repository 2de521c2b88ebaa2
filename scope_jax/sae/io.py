"""Reading and writing SAEs and transcoders: Gemma Scope `params.npz`, Gemma Scope 2 folders and
SAELens directories (docs/recipe.md §7, §10).

    sae = load_sae("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz")
    sae = load_sae("gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_small")  # config.json + params.safetensors
    sae = load_sae("exports/saelens/res.6-w4096-l0.001")     # cfg.json + sae_weights.safetensors
    save_sae(sae, "out/params.npz", format="gemma-scope")
    save_sae(sae, "out/layer_6_width_4k_l0_40", format="gemma-scope-2")
    save_sae(sae, "out/my_sae", format="saelens", sparsity_log10=density)

Gemma Scope 2's layout is what SAELens's Gemma 3 loader (`gemma_3_sae_huggingface_loader`) reads:
tensors `w_enc [d_in, M]`, `w_dec [M, d_out]`, `b_enc`, `b_dec`, `threshold` and for a
skip-transcoder `affine_skip_connection [d_in, d_out]`; `config.json` with `architecture:
"jump_relu"`, `model_name`, `hf_hook_point_in` (and `hf_hook_point_out`, `affine_connection` for
transcoders), hook points named as transformers names Gemma 3's modules.

Files hold the released form (raw inputs, no pre-encoder bias). A SAELens file trained with
`apply_b_dec_to_input` is converted on load; input normalizations it cannot express are refused.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from scope_jax.core.kinds import SAE as SAE_KIND
from scope_jax.core.kinds import SKIP_TRANSCODER, TRANSCODER, Kind, transcoder_sites
from scope_jax.layout import check_writable, record_file, staged_directory
from scope_jax.models.sites import parse_site
from scope_jax.sae.headers import check_npz, check_safetensors
from scope_jax.sae.model import PARAM_NAMES, SAE, SAEInfo

FORMATS = ("gemma-scope", "gemma-scope-2", "saelens", "int8", "saelens-batchtopk")
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write; older versions are read as pre-v6 configs

# our site kind -> TransformerLens/SAELens hook name template
HOOK_NAMES = {
  "res": "blocks.{layer}.hook_resid_post",
  "mlp": "blocks.{layer}.hook_mlp_out",
  "att": "blocks.{layer}.attn.hook_z",
  "mlp_in": "blocks.{layer}.ln2.hook_normalized",
}


def _layer_patterns(templates: dict[str, str]) -> dict[str, re.Pattern]:
  """Per site kind, a regex matching its hook name template with the layer as group 1."""
  return {kind: re.compile("^" + re.escape(t).replace(r"\{layer\}", r"(\d+)") + "$") for kind, t in templates.items()}


_HOOK_PATTERNS = _layer_patterns(HOOK_NAMES)
_SAELENS_WEIGHTS, _SAELENS_CFG, _SAELENS_SPARSITY = "sae_weights.safetensors", "cfg.json", "sparsity.safetensors"
_GS2_PARAMS, _GS2_CONFIG = "params.safetensors", "config.json"
_INT8_PARAMS = "params_int8.safetensors"  # beside a Gemma Scope 2 config.json: the int8 form (sae/quantize.py)
# our site kind -> the transformers module whose output (or input) it is, as Gemma Scope 2 names hook points
HF_HOOK_POINTS = {
  "res": "model.layers.{layer}.output",
  "att": "model.layers.{layer}.self_attn.o_proj.input",
  "mlp": "model.layers.{layer}.post_feedforward_layernorm.output",
  "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
}
_HF_PATTERNS = _layer_patterns(HF_HOOK_POINTS)
GS2_FOLDERS = {"res": "resid_post", "att": "attn_out", "mlp": "mlp_out"}  # SAEs; transcoders: "transcoder"


def hook_name(site: str, names: dict[str, str] = HOOK_NAMES) -> str:
  """The site's hook name: SAELens's by default, Gemma Scope 2's with `names=HF_HOOK_POINTS`."""
  s = parse_site(site)
  return names[s.kind].format(layer=s.layer)


def site_from_hook_name(name: str) -> str | None:
  """Our site of a TransformerLens hook name (SAELens) or a transformers hook point (Gemma Scope 2)."""
  name = (name or "").replace(".hook_mlp_in", ".ln2.hook_normalized")  # SAELens's other name for mlp_in
  name = re.sub(r"^model\.language_model\.", "model.", name)  # Gemma 3's multimodal models
  for patterns in (_HOOK_PATTERNS, _HF_PATTERNS):
    for kind, pattern in patterns.items():
      if m := pattern.match(name):
        return f"{kind}.{m.group(1)}"
  return None


def width_name(width: int) -> str:
  """Gemma Scope's folder name for a width: 16384 -> '16k', 131072 -> '131k', 2**20 -> '1m'."""
  if width >= 2**20 and width % 2**20 == 0:
    return f"{width // 2**20}m"
  return f"{width // 1000}k" if width >= 1000 else str(width)


def _sites_from_path(path: Path) -> tuple[str | None, str | None]:
  """(site, transcoder target) from a Gemma Scope path: `.../gemma-scope-2b-pt-res/layer_12/...` or
  `.../res/layer_12/...` -> ('res.12', None); `.../gemma-scope-2b-pt-transcoders/layer_3/...` or
  `.../transcoder/layer_3/...` -> ('mlp_in.3', 'mlp.3')."""
  parts = path.parts
  for i, part in enumerate(parts):
    m = re.fullmatch(r"layer_(\d+)", part)
    if m and i > 0:
      if re.search(r"(?:^|-|_)(skip_)?transcoders?$", parts[i - 1]):
        return transcoder_sites(m.group(1))
      kind = re.search(r"(?:^|-)(mlp_in|res|mlp|att)s?$", parts[i - 1])
      if kind:
        return f"{kind.group(1)}.{m.group(1)}", None
  return None, None


def _check_shapes(arrays: dict[str, np.ndarray], where: str, transcoder: bool = False) -> None:
  """Shapes of an SAE (`d_out = d_in`) or a transcoder (`d_out` from W_dec)."""
  d, m = arrays["W_enc"].shape if arrays["W_enc"].ndim == 2 else (None, None)
  d_out = (arrays["W_dec"].shape[-1] if arrays["W_dec"].ndim == 2 else None) if transcoder else d
  expected = {"W_enc": (d, m), "b_enc": (m,), "W_dec": (m, d_out), "b_dec": (d_out,), "threshold": (m,)}
  if "W_skip" in arrays:
    expected["W_skip"] = (d, d_out)
  for k, shape in expected.items():
    if d is None or d_out is None or arrays[k].shape != shape:
      raise ValueError(
        f"{where}: {k} has shape {arrays[k].shape}; expected {shape} for W_enc {arrays['W_enc'].shape} = "
        f"[d_in, width] and W_dec {arrays['W_dec'].shape} = [width, d_out]"
      )


def _check_values(arrays: dict[str, np.ndarray], where: str) -> None:
  """Every weight finite and every threshold >= 0: what a JumpReLU SAE can hold."""
  for k in arrays:
    bad = int(np.size(arrays[k]) - np.count_nonzero(np.isfinite(arrays[k])))
    if bad:
      raise ValueError(f"{where}: {k} holds {bad} NaN or Inf values; expected finite weights")
  if negative := int(np.count_nonzero(arrays["threshold"] < 0)):
    raise ValueError(f"{where}: threshold holds {negative} negative values; expected thresholds >= 0")


def _from_arrays(arrays: dict[str, np.ndarray], info: SAEInfo, where: str) -> SAE:
  _check_shapes(arrays, where, info.target_site is not None or "W_skip" in arrays)
  _check_values(arrays, where)
  import jax.numpy as jnp

  return SAE(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}, info=info)


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
      members = {k: by_lower[k.lower()] for k in PARAM_NAMES + ("W_skip",) if k.lower() in by_lower}
      check_npz(path, list(members.values()))  # before numpy allocates what the headers declare
      arrays = {k: z[member] for k, member in members.items()}
  except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
    if str(path) in str(e):
      raise
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  path_site, path_target = _sites_from_path(path.resolve())
  info = SAEInfo(site=site or path_site, target_site=path_target)
  return _from_arrays(arrays, info, str(path))


def _read_json(path: Path) -> dict:
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
  return cfg


def save_file(tensors: dict[str, np.ndarray], path: Path) -> None:
  """safetensors' `save_file`, its failed writes raised as the `OSError` they are (it reports them
  as its own error type, "... (os error 28)"), so a full disk reads as one, whoever writes first."""
  from safetensors.numpy import save_file as write

  try:
    write(tensors, path)
  except Exception as e:
    if isinstance(e, OSError) or not (code := re.search(r"os error (\d+)", str(e))):
      raise
    raise OSError(int(code.group(1)), f"{path}: {os.strerror(int(code.group(1)))}") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  check_safetensors(path)  # before any tensor is allocated
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types for damaged files
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def _load_gemma_scope_2(path: Path, site: str | None) -> SAE:
  cfg = _read_json(path / _GS2_CONFIG)
  if cfg.get("architecture") != "jump_relu":
    raise ValueError(f"{path / _GS2_CONFIG}: architecture {cfg.get('architecture')!r}; expected 'jump_relu'")
  raw = _read_safetensors(path / _GS2_PARAMS)
  names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
  if missing := [k for k in names if k not in raw]:
    raise ValueError(f"{path / _GS2_PARAMS}: missing tensors {missing} (found {sorted(raw)})")
  arrays = {ours: raw[theirs].astype(np.float32) for theirs, ours in names.items()}
  if cfg.get("affine_connection"):
    if "affine_skip_connection" not in raw:
      raise ValueError(f"{path / _GS2_PARAMS}: config says affine_connection but holds no affine_skip_connection")
    arrays["W_skip"] = raw["affine_skip_connection"].astype(np.float32)
  return _from_arrays(arrays, _gs2_info(cfg, site), str(path / _GS2_PARAMS))


def _gs2_info(cfg: dict, site: str | None) -> SAEInfo:
  """Where a Gemma Scope 2 config.json says the SAE reads (and writes, for a transcoder)."""
  hook_in, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
  return SAEInfo(
    site=site or site_from_hook_name(hook_in),
    target_site=site_from_hook_name(hook_out) if hook_out and hook_out != hook_in else None,
    model=cfg.get("model_name"),
  )


def _load_int8(path: Path, site: str | None) -> SAE:
  """The int8 form: W_enc / W_dec as int8 with one float32 scale per latent, read back as float32."""
  from scope_jax.sae.quantize import dequantize_int8

  raw = _read_safetensors(path / _INT8_PARAMS)
  names = ("w_enc", "w_enc_scale", "w_dec", "w_dec_scale", "b_enc", "b_dec", "threshold")
  if missing := [k for k in names if k not in raw]:
    raise ValueError(f"{path / _INT8_PARAMS}: missing tensors {missing} (found {sorted(raw)})")
  if raw["w_enc"].dtype != np.int8 or raw["w_dec"].dtype != np.int8:
    raise ValueError(
      f"{path / _INT8_PARAMS}: w_enc and w_dec must be int8 (found {raw['w_enc'].dtype}, {raw['w_dec'].dtype})"
    )
  arrays = {
    "W_enc": dequantize_int8(raw["w_enc"], raw["w_enc_scale"], latent_axis=1),
    "W_dec": dequantize_int8(raw["w_dec"], raw["w_dec_scale"], latent_axis=0),
    **{k: raw[k].astype(np.float32) for k in ("b_enc", "b_dec", "threshold")},
  }
  if "w_skip" in raw:
    arrays["W_skip"] = raw["w_skip"].astype(np.float32)
  return _from_arrays(arrays, _gs2_info(_read_json(path / _GS2_CONFIG), site), str(path / _INT8_PARAMS))


SAELENS_ARCHITECTURES = {
  SAE_KIND.name: "jumprelu",
  TRANSCODER.name: "jumprelu_transcoder",
  SKIP_TRANSCODER.name: "jumprelu_skip_transcoder",
}


# SAELens classes of SAEs whose latents are chosen by rank: TopK (released as it is) and the
# BatchTopK training classes (read as SAELens releases them: a JumpReLU with their learnt threshold)
SAELENS_RANKED = ("topk", "batchtopk", "matryoshka_batchtopk")


def _load_saelens(path: Path, site: str | None) -> SAE:
  cfg = _read_json(path / _SAELENS_CFG)
  architecture = cfg.get("architecture")
  if architecture not in (*SAELENS_ARCHITECTURES.values(), *SAELENS_RANKED):
    raise ValueError(
      f"{path / _SAELENS_CFG}: architecture {architecture!r}; scope_jax reads "
      f"{sorted((*SAELENS_ARCHITECTURES.values(), *SAELENS_RANKED))}"
    )
  if cfg.get("normalize_activations", "none") not in ("none", None):
    raise ValueError(
      f"{path / _SAELENS_CFG}: normalize_activations={cfg['normalize_activations']!r}; "
      f"only 'none' can be loaded (fold the normalization into the weights first)"
    )
  raw = _read_safetensors(path / _SAELENS_WEIGHTS)
  ranked = architecture in SAELENS_RANKED
  needed = PARAM_NAMES + (("W_skip",) if architecture == SAELENS_ARCHITECTURES[SKIP_TRANSCODER.name] else ())
  if ranked:
    needed = tuple(k for k in PARAM_NAMES if k != "threshold") + (("topk_threshold",) if architecture != "topk" else ())
  if missing := [k for k in needed if k not in raw]:
    raise ValueError(
      f"{path / _SAELENS_WEIGHTS}: missing tensors {missing} (a SAELens {architecture!r} holds {needed})"
    )
  arrays = {k: raw[k].astype(np.float32) for k in needed if k != "topk_threshold"}
  if ranked:
    theta = float(np.asarray(raw["topk_threshold"]).reshape(())) if "topk_threshold" in raw else 0.0
    arrays["threshold"] = np.full(arrays["b_enc"].shape, theta, np.float32)  # BatchTopK: one θ for every latent
  if "W_skip" in arrays:  # SAELens holds it as [d_out, d_in]
    arrays["W_skip"] = arrays["W_skip"].T
  _check_shapes(arrays, str(path / _SAELENS_WEIGHTS), cfg["architecture"] != SAELENS_ARCHITECTURES["sae"])
  sizes = {"d_in": arrays["W_enc"].shape[0], "d_sae": arrays["W_enc"].shape[1]}
  for field, size in sizes.items():
    if field in cfg and cfg[field] != size:
      raise ValueError(f"{path / _SAELENS_CFG}: {field} = {cfg[field]!r}, but the weights have {field} {size}")
  if cfg.get("apply_b_dec_to_input", False):  # pre = (x - b_dec) W + b  ==  x W + (b - b_dec W)
    arrays["b_enc"] = arrays["b_enc"] - arrays["b_dec"] @ arrays["W_enc"]
  if ranked and cfg.get("rescale_acts_by_decoder_norm"):  # it then ranks z·||W_dec||: a plain TopK only at unit norm
    if not np.allclose(np.linalg.norm(arrays["W_dec"], axis=-1), 1.0, atol=1e-5):
      raise ValueError(
        f"{path / _SAELENS_CFG}: rescale_acts_by_decoder_norm with decoder rows not of unit norm; "
        "fold the norms in SAELens first (fold_W_dec_norm)"
      )
  meta = cfg.get("metadata", {}) or {}
  hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
  info = SAEInfo(
    site=site or meta.get("scope_jax_site") or site_from_hook_name(meta.get("hook_name") or cfg.get("hook_name")),
    target_site=meta.get("scope_jax_target_site") or (site_from_hook_name(hook_out) if hook_out else None),
    model=meta.get("model_name"),
    context_size=meta.get("context_size"),
    dataset=meta.get("dataset_path"),
    l1_coefficient=meta.get("l1_coefficient"),
    prefixes=tuple(cfg.get("matryoshka_widths") or ()),
    activation="topk" if architecture == "topk" else "jumprelu",
    k=_saelens_k(cfg, path / _SAELENS_CFG, architecture, arrays["W_enc"].shape[1]) if ranked else None,
  )
  return _from_arrays(arrays, info, str(path))


def _saelens_k(cfg: dict, where: Path, architecture: str, width: int) -> int:
  """TopK's (or BatchTopK's) k from a SAELens cfg.json: a number in [1, width)."""
  k = cfg.get("k")
  if not isinstance(k, (int, float)) or isinstance(k, bool) or not 1 <= k < width or int(k) != k:
    raise ValueError(f"{where}: k = {k!r}; a SAELens {architecture!r} needs an integer k in [1, {width})")
  return int(k)


def load_sae(path: str | Path, site: str | None = None) -> SAE:
  """Reads an SAE from a Gemma Scope `params.npz` (or its folder) or a SAELens directory.

  `site` (e.g. "res.12") overrides what the file or path says about where the SAE belongs.
  """
  path = Path(path)
  if site is not None:
    parse_site(site)
  if path.is_dir() and (path / _SAELENS_CFG).exists():
    return _load_saelens(path, site)
  if path.is_dir() and (path / _INT8_PARAMS).exists():
    return _load_int8(path, site)
  if path.is_dir() and (path / _GS2_PARAMS).exists():
    if not (path / _GS2_CONFIG).exists():
      raise FileNotFoundError(f"{path}: holds {_GS2_PARAMS} but no {_GS2_CONFIG} (a Gemma Scope 2 folder has both)")
    return _load_gemma_scope_2(path, site)
  if path.is_dir() and (path / "params.npz").exists():
    path = path / "params.npz"
  if path.is_file() and path.suffix == ".npz":
    return _load_npz(path, site)
  raise FileNotFoundError(
    f"{path}: not an SAE; expected a Gemma Scope params.npz (or a folder holding one), a Gemma Scope 2 "
    f"folder ({_GS2_CONFIG} + {_GS2_PARAMS}) or a SAELens directory with {_SAELENS_CFG}"
  )


def kind_of(sae: SAE) -> Kind:
  """What `sae` is: an SAE, a transcoder (it names a target site) or a skip-transcoder (it has W_skip)."""
  if sae.W_skip is not None:
    return SKIP_TRANSCODER
  return TRANSCODER if sae.info.target_site else SAE_KIND


def _staged(path: Path, write) -> Path:
  """A directory written whole beside `path` by `write(staging)`, then swapped in; `path` must be
  new, empty or a folder scope_jax wrote (layout.NotOurs otherwise: a user's folder is never replaced)."""
  with staged_directory(path, "SAE") as staging:
    write(staging)
  return path


def save_sae(sae: SAE, path: str | Path, format: str = "gemma-scope", sparsity_log10: np.ndarray | None = None) -> Path:
  """Writes the released-form `sae`; returns the file (gemma-scope) or directory (the others).

  gemma-scope: `path` is the `.npz` file, or a folder that receives `params.npz` (a skip-transcoder
  adds `W_skip`). gemma-scope-2: `path` is the folder of `params.safetensors` + `config.json`.
  saelens: `path` is a directory; `sparsity_log10 [M]` (log10 firing density) is written to
  sparsity.safetensors when given; a TopK SAE as SAELens' "topk" class. saelens-batchtopk: a
  BatchTopK SAE (every latent's θ the same) as SAELens' "batchtopk" training class (Matryoshka:
  "matryoshka_batchtopk"), θ as its `topk_threshold`. int8: a Gemma Scope 2 folder whose
  `params_int8.safetensors` holds W_enc and W_dec as int8 with a float32 scale per latent
  (sae/quantize.py). A TopK SAE has no threshold: only saelens can hold it.
  """
  if format not in FORMATS:
    raise ValueError(f"format {format!r}: expected one of {FORMATS}")
  if sae.W_enc.ndim != 2:
    raise ValueError(f"save_sae takes one SAE; got a stack of shape {sae.W_enc.shape} (use sae.model.unstack)")
  arrays = sae.numpy()
  path = Path(path)
  if sae.info.activation == "topk" and format != "saelens":
    raise ValueError(f"{path}: a TopK SAE is written as saelens (format {format!r} releases a JumpReLU's threshold)")
  if format == "gemma-scope":
    if path.suffix != ".npz":
      path = path / "params.npz"
    check_writable(path)  # a params.npz scope_jax did not write is never overwritten
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
      np.savez(tmp, **arrays)
      tmp.replace(path)
    finally:
      tmp.unlink(missing_ok=True)
    record_file(path)
    return path

  info, kind = sae.info, kind_of(sae)

  def gs2_config(**extra) -> str:
    cfg = {"architecture": "jump_relu", "model_name": info.model, **extra}
    if info.site:
      cfg["hf_hook_point_in"] = hook_name(info.site, HF_HOOK_POINTS)
    if info.target_site:
      cfg["hf_hook_point_out"] = hook_name(info.target_site, HF_HOOK_POINTS)
      cfg["affine_connection"] = kind.skip
    return json.dumps(cfg, indent=2) + "\n"

  if format == "gemma-scope-2":

    def write_gs2(staging: Path) -> None:
      tensors = {k.lower(): v for k, v in arrays.items() if k != "W_skip"}
      if "W_skip" in arrays:
        tensors["affine_skip_connection"] = arrays["W_skip"]
      save_file(tensors, staging / _GS2_PARAMS)
      (staging / _GS2_CONFIG).write_text(gs2_config())

    return _staged(path, write_gs2)
  if format == "int8":  # Gemma Scope 2's folder, its matrices int8 under another file name (no reader misreads it)
    from scope_jax.sae.quantize import int8_per_latent

    def write_int8(staging: Path) -> None:
      (w_enc, enc_scale), (w_dec, dec_scale) = int8_per_latent(arrays["W_enc"], 1), int8_per_latent(arrays["W_dec"], 0)
      tensors = {"w_enc": w_enc, "w_enc_scale": enc_scale, "w_dec": w_dec, "w_dec_scale": dec_scale}
      tensors |= {k: arrays[k] for k in ("b_enc", "b_dec", "threshold")}
      if "W_skip" in arrays:
        tensors["w_skip"] = arrays["W_skip"]
      save_file(tensors, staging / _INT8_PARAMS)
      (staging / _GS2_CONFIG).write_text(gs2_config(quantization="int8, one float32 scale per latent (w = q * scale)"))

    return _staged(path, write_int8)

  architecture = SAELENS_ARCHITECTURES[kind.name]
  if info.activation == "topk" or format == "saelens-batchtopk":
    if kind.transcoder:
      raise ValueError(f"{path}: SAELens has no TopK or BatchTopK transcoder class; write a JumpReLU format")
    architecture = "topk" if info.activation == "topk" else ("matryoshka_batchtopk" if info.prefixes else "batchtopk")
    ranked = {"k": info.k, "rescale_acts_by_decoder_norm": False}  # our decoder rows have unit norm
    if architecture != "topk":  # the training class: θ is its topk_threshold (one value for every latent)
      theta = np.unique(arrays["threshold"])
      if len(theta) != 1:
        raise ValueError(f"{path}: a BatchTopK SAE has one threshold for every latent; this one has {len(theta)}")
      arrays["topk_threshold"] = np.asarray(theta[0], np.float64)
      ranked |= {"matryoshka_widths": list(info.prefixes)} if info.prefixes else {}
    del arrays["threshold"]
  else:
    ranked = {}

  def write_saelens(staging: Path) -> None:
    tensors = dict(arrays)
    if "W_skip" in tensors:  # SAELens holds it as [d_out, d_in]
      tensors["W_skip"] = np.ascontiguousarray(tensors["W_skip"].T)
    save_file(tensors, staging / _SAELENS_WEIGHTS)
    if sparsity_log10 is not None:
      save_file({"sparsity": np.asarray(sparsity_log10, np.float32)}, staging / _SAELENS_SPARSITY)
    cfg = {
      "architecture": architecture,
      **ranked,
      "d_in": sae.d_in,
      "d_sae": sae.width,
      **({"d_out": int(sae.W_dec.shape[-1])} if kind.transcoder else {}),
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
        **(
          {"hook_name_out": hook_name(info.target_site), "scope_jax_target_site": info.target_site}
          if info.target_site
          else {}
        ),
      },
    }
    (staging / _SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")

  return _staged(path, write_saelens)


__all__ = ["FORMATS", "hook_name", "kind_of", "load_sae", "save_sae", "site_from_hook_name", "width_name"]
