"""`LanguageModel`: a loaded Gemma placed on a mesh, with jitted logits and activations."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scope_jax.models import checkpoints
from scope_jax.models.config import GemmaConfig
from scope_jax.models.embedded import EMBEDDED, embedded_gguf_path
from scope_jax.models.gemma import BLOCK_SITES, PARAM_AXES, FromSite, Gemma, Replacement
from scope_jax.models.gguf_file import GGUFModel
from scope_jax.models.sites import Site, parse_site
from scope_jax.parallel import mesh as mesh_lib
from scope_jax.parallel.precision import at_precision, check_precision
from scope_jax.text.tokenizer import Tokenizer


def _forward(state, tokens_bt, graphdef, capture, replace, with_logits, out_dtype):
  model = nnx.merge(graphdef, state)
  logits, acts = model(tokens_bt, capture=capture, replace=dict(replace), with_logits=with_logits)
  acts = {site.name: act.astype(out_dtype) for site, act in acts.items()}
  return (None if logits is None else logits.astype(out_dtype)), acts


def _losses_forward(state, tokens_bt, graphdef, replace):
  return nnx.merge(graphdef, state).token_losses(tokens_bt, replace=dict(replace))


def _to_site(state, tokens_bt, graphdef, site):
  return nnx.merge(graphdef, state).to_site(tokens_bt, site)


def _losses_from_site(state, tokens_bt, resid_btd, act, graphdef, site):
  return nnx.merge(graphdef, state).losses_from_site(resid_btd, act, site, tokens_bt)


def _between(state, resid_btd, act, graphdef, start, stop):
  return nnx.merge(graphdef, state).between(resid_btd, act, start, stop)


class LanguageModel:
  """A Gemma 2 / Gemma 3 decoder whose parameters live on `mesh` (see `load_model`)."""

  def __init__(self, model: Gemma, mesh: Mesh, tokenizer: Tokenizer | None, source: str, precision: str = "float32"):
    self.config: GemmaConfig = model.config
    self.precision = check_precision(precision)  # every program's matmuls (parallel/precision.py)
    self.dtype = model.dtype
    self.mesh = mesh
    self.tokenizer = tokenizer
    self.source = source
    self._graphdef, self._state = nnx.split(model)
    state_shardings = jax.tree.map(lambda x: x.sharding, self._state)
    self._batch_sharding = NamedSharding(mesh, P(mesh_lib.DATA))
    self._jitted = jax.jit(
      at_precision(precision, _forward),
      in_shardings=(state_shardings, self._batch_sharding),
      out_shardings=self._batch_sharding,
      static_argnums=(2, 3, 4, 5, 6),
    )  # graphdef, capture, replace, with_logits, out_dtype
    self._jitted_losses = jax.jit(
      at_precision(precision, _losses_forward),
      in_shardings=(state_shardings, self._batch_sharding),
      out_shardings=self._batch_sharding,
      static_argnums=(2, 3),
    )
    # The two halves of a forward split at a site: one program per (site, dtype), whatever is spliced
    self.jitted_to_site = jax.jit(
      at_precision(precision, _to_site),
      in_shardings=(state_shardings, self._batch_sharding),
      out_shardings=self._batch_sharding,
      static_argnums=(2, 3),
    )
    self._jitted_between = None  # compiled on first use (`between`)
    self.jitted_from_site = jax.jit(
      at_precision(precision, _losses_from_site),
      in_shardings=(state_shardings, *[self._batch_sharding] * 3),
      out_shardings=self._batch_sharding,
      static_argnums=(4, 5),
    )

  def parts(self) -> tuple[nnx.GraphDef, nnx.State]:
    """The model as (graphdef, parameters on the mesh) for programs of its own that run it
    (`nnx.merge`), such as the KL finetuning step that differentiates through the layers after a
    site (finetune/kl.py). The parameters are the model's own: never donate or update them."""
    return self._graphdef, self._state

  def between(self, resid: jax.Array, act: jax.Array, start: str, stop: str) -> tuple[jax.Array, jax.Array]:
    """The forward from site `start` (`to_site`'s residual, `act` in place of its activation) to the
    later site `stop`: (the residual there, `stop`'s activation), on the devices."""
    if self._jitted_between is None:
      shardings = jax.tree.map(lambda x: x.sharding, self._state)
      self._jitted_between = jax.jit(
        at_precision(self.precision, _between),
        in_shardings=(shardings, self._batch_sharding, self._batch_sharding),
        out_shardings=self._batch_sharding,
        static_argnums=(3, 4, 5),
      )
    start_site, stop_site = parse_site(start, self.config), parse_site(stop, self.config)
    return self._jitted_between(self._state, resid, act.astype(resid.dtype), self._graphdef, start_site, stop_site)

  def logits(self, tokens, replace: Mapping[str, Replacement] | None = None, dtype=jnp.float32) -> jax.Array:
    """int [B, T] -> [B, T, V]. `replace={site: fn}` splices `fn(activation)` in at that site;
    `replace={site: FromSite(source, fn)}` splices `fn(source's activation, site's activation)`,
    `source` an earlier site of the same layer; a transcoder:
    `replace={"mlp.3": FromSite("mlp_in.3", lambda x, _: predict(x))}`.

    Each distinct `fn` object compiles once; reuse the same function across calls.
    """
    logits, _ = self._run(tokens, (), self._replacements(replace), True, dtype)
    return logits

  def token_losses(self, tokens, replace: Mapping[str, Replacement] | None = None) -> jax.Array:
    """int [B, T] -> float32 [B, T-1]: -log p(token[t+1] | tokens[:t+1]), optionally spliced (as `logits`)."""
    replace_items = self._replacements(replace)
    tokens_bt, batch = self._place(tokens)
    return self._jitted_losses(self._state, tokens_bt, self._graphdef, replace_items)[:batch]

  def to_site(self, tokens, site: str) -> tuple[jax.Array, jax.Array, int]:
    """The forward up to `site`, kept on the devices: (the residual there `[B', T, d]`, the site's
    activation `[B', T, width]`, B). B' ≥ B: the batch padded to the mesh; the model's dtype."""
    tokens_bt, batch = self._place(tokens)
    resid, act = self.jitted_to_site(self._state, tokens_bt, self._graphdef, parse_site(site, self.config))
    return resid, act, batch

  def token_losses_from_site(self, tokens, site: str, resid: jax.Array, act: jax.Array) -> jax.Array:
    """float32 `[B', T-1]` next-token losses of the forward resumed at `site` from `to_site`'s
    residual with `act` (the site's activation, replaced or not) in place of its activation."""
    tokens_bt, _ = self._place(tokens)
    return self.jitted_from_site(
      self._state, tokens_bt, resid, act.astype(resid.dtype), self._graphdef, parse_site(site, self.config)
    )

  def unembedding(self) -> jax.Array:
    """float32 `[V, d]`: the logits a residual-stream direction `u` writes are `unembedding() @ u`,
    up to the final norm's positive per-token factor (its scale, 1 + w, is folded in): the
    direct logit effect of a decoder direction."""
    model = nnx.merge(self._graphdef, self._state)
    scale_d = 1.0 + model.final_norm.scale[...].astype(jnp.float32)
    return model.embed[...].astype(jnp.float32) * scale_d

  def astype(self, dtype) -> LanguageModel:
    """The same model with its parameters cast to `dtype` (no reload), on the same mesh."""
    model = nnx.merge(self._graphdef, jax.tree.map(lambda x: x.astype(dtype), self._state))
    model.dtype = dtype
    return LanguageModel(model, self.mesh, self.tokenizer, self.source, self.precision)

  def activations(self, tokens, sites: Sequence[str], dtype=jnp.float32) -> dict[str, jax.Array]:
    """int [B, T] -> {site: [B, T, width]}; the forward stops after the deepest site."""
    if isinstance(sites, str):
      sites = [sites]
    if not sites:
      raise ValueError("activations() needs at least one site")
    parsed = [parse_site(s, self.config) for s in sites]
    _, acts = self._run(tokens, tuple(dict.fromkeys(parsed)), (), False, dtype)
    return {site.name: acts[site.name] for site in parsed}

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (no KV cache: a smoke test, not a serving path).

    The sequence is padded to its final length up front so every step reuses one compilation;
    causal attention makes the padding invisible to earlier positions.
    """
    ids = list(prompt_ids)
    tokens = np.full((1, len(ids) + max_new_tokens), self.config.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    for _ in range(max_new_tokens):
      next_id = int(jnp.argmax(self.logits(tokens)[0, len(ids) - 1]))
      tokens[0, len(ids)] = next_id
      ids.append(next_id)
      if next_id == self.config.eos_id:
        break
    return ids

  def _replacements(self, replace: Mapping[str, Replacement] | None) -> tuple[tuple[Site, Replacement], ...]:
    """`{name: fn or FromSite}` -> ((Site, fn or FromSite with a parsed source), ...), checked."""
    items = []
    for name, fn in (replace or {}).items():
      site = parse_site(name, self.config)
      if isinstance(fn, FromSite):
        source = parse_site(fn.source.name if isinstance(fn.source, Site) else fn.source, self.config)
        if source.layer != site.layer or BLOCK_SITES.index(source.kind) >= BLOCK_SITES.index(site.kind):
          raise ValueError(
            f"replace[{name!r}] reads {source.name}: a FromSite source must be an earlier site of layer "
            f"{site.layer}, one of {[f'{k}.{site.layer}' for k in BLOCK_SITES[: BLOCK_SITES.index(site.kind)]]}"
          )
        fn = dataclasses.replace(fn, source=source)
      elif not callable(fn):
        raise TypeError(f"replace[{name!r}] is a {type(fn).__name__}, expected a function or a FromSite")
      items.append((site, fn))
    return tuple(items)

  def _place(self, tokens) -> tuple[jax.Array, int]:
    """Checked tokens on the mesh, the batch padded to a multiple of the `data` axis."""
    tokens_bt = self.check_tokens(tokens)
    batch = tokens_bt.shape[0]
    pad = -batch % self.mesh.shape[mesh_lib.DATA]
    if pad:
      tokens_bt = np.concatenate([tokens_bt, np.full((pad, tokens_bt.shape[1]), self.config.pad_id, np.int32)])
    return mesh_lib.put(tokens_bt, self.mesh, ("batch", None), what="tokens"), batch

  def _run(self, tokens, capture: tuple[Site, ...], replace, with_logits: bool, dtype):
    tokens_bt, batch = self._place(tokens)
    pad = tokens_bt.shape[0] - batch
    logits, acts = self._jitted(self._state, tokens_bt, self._graphdef, capture, replace, with_logits, jnp.dtype(dtype))
    if pad:
      logits = None if logits is None else logits[:batch]
      acts = {k: v[:batch] for k, v in acts.items()}
    return logits, acts

  def check_tokens(self, tokens) -> np.ndarray:
    """Validates token ids on the host: int32 [B, T] inside the vocabulary."""
    tokens_bt = np.asarray(tokens)
    if tokens_bt.ndim != 2 or not np.issubdtype(tokens_bt.dtype, np.integer):
      raise ValueError(f"tokens must be an integer array [batch, seq]; got {tokens_bt.dtype} {tokens_bt.shape}")
    bad = (tokens_bt < 0) | (tokens_bt >= self.config.vocab_size)
    if bad.any():
      b, t = np.argwhere(bad)[0]
      raise ValueError(
        f"token id {tokens_bt[b, t]} at [{b}, {t}] is outside the vocabulary [0, {self.config.vocab_size})"
      )
    return tokens_bt.astype(np.int32)


def check_mesh(config: GemmaConfig, mesh: Mesh) -> None:
  model = mesh.shape[mesh_lib.MODEL]
  for what, size in (("num_attention_heads", config.n_heads), ("intermediate_size (d_ff)", config.d_ff)):
    if size % model:
      raise ValueError(f"mesh axis 'model' of size {model} does not divide {what}={size}")


def place_parameters(config: GemmaConfig, reader: checkpoints.Reader, mesh: Mesh, dtype) -> Gemma:
  """Builds the model abstractly, then reads and places one parameter at a time."""
  check_mesh(config, mesh)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Gemma(config, dtype)))
  pure = nnx.to_pure_dict(state)

  def place(path, abstract):
    keys = tuple(k.key for k in path)
    name = "/".join(map(str, keys))
    x = reader(keys)  # readers check each tensor's shape against the config
    return mesh_lib.put(np.asarray(x, dtype=abstract.dtype), mesh, PARAM_AXES[keys[-1]], what=name)

  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(place, pure))
  return nnx.merge(graphdef, state)


def _find_tokenizer(directory: str) -> Tokenizer | None:
  for candidate in (directory, os.path.dirname(os.path.abspath(directory))):
    path = os.path.join(candidate, "tokenizer.model")
    if os.path.exists(path):
      return Tokenizer.from_file(path)
  return None


def load_model(
  source: str,
  *,
  dtype=jnp.float32,
  mesh: Mesh | None = None,
  config: GemmaConfig | None = None,
  precision: str = "float32",
) -> LanguageModel:
  """Loads a Gemma from a HF directory, a google-deepmind/gemma checkpoint, a `.gguf` file,
  or the name of an embedded model, and places it on `mesh` (default: all devices on `data`).

  `config` overrides the config read from (or, for google-deepmind checkpoints, inferred
  from) the checkpoint; `precision`: its matmuls', `float32` or `bfloat16` (parallel/precision.py).
  """
  source = os.fspath(source)
  mesh = mesh or mesh_lib.make_mesh()
  tokenizer = None
  if source in EMBEDDED:
    source = embedded_gguf_path(source)
  if source.endswith(".gguf"):
    gguf_model = GGUFModel(source)
    config = config or gguf_model.config
    reader = gguf_model.reader(config)
    tokenizer = Tokenizer(gguf_model.tokenizer_proto(), source=source)
  elif os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")):
    config = config or checkpoints.read_hf_config(source)
    reader = checkpoints.hf_reader(source, config)
  elif checkpoints.is_orbax_checkpoint(source):
    params = checkpoints.read_orbax_params(source)
    config = config or checkpoints.config_from_orbax_shapes(params, source)
    reader = checkpoints.orbax_reader(params, config, source)
  elif not os.path.exists(source):
    raise FileNotFoundError(f"model source {source!r} does not exist")
  else:
    raise ValueError(
      f"model source {source!r} is not a HF directory (config.json + *.safetensors), "
      f"a google-deepmind/gemma orbax checkpoint, a .gguf file or one of {EMBEDDED}"
    )
  model = place_parameters(config, reader, mesh, dtype)
  return LanguageModel(model, mesh, tokenizer or _find_tokenizer(source), source, precision)
