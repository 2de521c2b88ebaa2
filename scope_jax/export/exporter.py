"""Export a trained sweep: fold the normalization (docs/recipe.md §3), measure L0 and latent densities,
write each SAE (or transcoder) as Gemma Scope `params.npz` in the hub layout, as a Gemma Scope 2
folder and as a SAELens directory. A TopK SAE is released as SAELens' TopK class alone (the other
formats are JumpReLU's); a BatchTopK SAE as a JumpReLU with its learnt θ in every format, and also as
SAELens' BatchTopK training class (train/topk.py).

    workdir/export/gemma-scope/res/layer_6/width_4k/average_l0_37/params.npz
    workdir/export/gemma-scope/transcoder/layer_6/width_4k/average_l0_37/params.npz     (transcoders)
    workdir/export/gemma-scope-2/resid_post/layer_6_width_4k_l0_37/{params.safetensors,config.json}
    workdir/export/gemma-scope-2/transcoder/layer_6_width_4k_l0_37_affine/...          (skip-transcoders)
    workdir/export/saelens/res.6-w4096-l0.001-s0/{cfg.json,sae_weights.safetensors,sparsity.safetensors}
    workdir/export/index.json     every SAE: name, width, λ, seed, L0, density summary, paths
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from scope_jax.core.kinds import SAE, Kind, config_target_site, kind_named
from scope_jax.data.batch import Batch, BatchSource
from scope_jax.export.entries import FORMAT_OF_KEY, ExportEntry, index_json
from scope_jax.layout import RunLayout, check_replaceable, export_identity, staged_directory
from scope_jax.models.sites import parse_site
from scope_jax.parallel.precision import traced_at
from scope_jax.sae.io import GS2_FOLDERS, save_sae, width_name
from scope_jax.sae.model import SAEInfo, fold, training_pre, unstack
from scope_jax.sae.topk import topk_mask
from scope_jax.train import stacked
from scope_jax.train.checkpoints import restore_latest
from scope_jax.train.params import TrainParams
from scope_jax.train.run import make_train_mesh, source_from_config


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fire_counts(
  params: tuple[TrainParams, ...], rows: Batch, transcoder: bool, topk: tuple[bool, ...], ks: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
  """Per group `[saes, M]`: how many rows of the batch fire each latent as the released SAE would:
  above θ, or (a TopK group, `ks` `[saes]`) among a row's k largest (the layout's transpose is
  folded into the matmul here, not copied)."""

  def counts(sae, k, by_rank):
    pre = training_pre(sae, rows.x_bd, transcoder)
    return jnp.sum(topk_mask(pre, k) if by_rank else pre > sae.threshold, axis=0)

  return tuple(jax.vmap(lambda sae, k, t=t: counts(sae, k, t))(p.to_sae(), k) for p, k, t in zip(params, ks, topk))


def measure(
  params: tuple[TrainParams, ...],
  source: BatchSource,
  first_step: int,
  batches: int,
  groups: tuple[stacked.Group, ...],
  progress: bool = True,
  transcoder: bool = False,
) -> list[np.ndarray]:
  """Firing densities `[saes, M]` per group on `batches` batches from `first_step` on."""
  topk = tuple(g.activation == "topk" for g in groups)
  ks = tuple(jnp.asarray([int(v) if g.ranked else 0 for v, _ in g.members], jnp.int32) for g in groups)
  counts = None
  for s in tqdm(range(first_step, first_step + batches), desc="measure L0", disable=not progress):
    c = _fire_counts(params, source.batch(s), transcoder, topk, ks)
    counts = c if counts is None else tuple(a + b for a, b in zip(counts, c))
  return [np.asarray(c, np.float64) / (batches * source.batch_size) for c in counts]


def gemma_scope_dir(root: Path, site: str | None, width: int, l0: float, kind: Kind = SAE) -> Path:
  base = root / "gemma-scope"
  if site:
    s = parse_site(site)
    base = base / (kind.name if kind.transcoder else s.kind) / f"layer_{s.layer}"
  return base / f"width_{width_name(width)}" / f"average_l0_{round(l0)}"


def gemma_scope_2_dir(root: Path, site: str | None, width: int, l0: float, kind: Kind = SAE) -> Path:
  """Gemma Scope 2's folder: `resid_post/layer_6_width_16k_l0_40` (its names end in small, medium or
  big; ours in the measured L0); a transcoder's under `transcoder/`, a skip-transcoder's ending `_affine`."""
  s = parse_site(site) if site else None
  folder = "transcoder" if kind.transcoder else (GS2_FOLDERS.get(s.kind, s.kind) if s else "sae")
  name = f"layer_{s.layer if s else 0}_width_{width_name(width)}_l0_{round(l0)}"
  return root / "gemma-scope-2" / folder / (name + ("_affine" if kind.skip else ""))


def jumprelu_files(
  root: Path, config: ml_collections.ConfigDict, width: int, l0: float, kind: Kind, name: str, entries: list
) -> dict[str, str]:
  """Where a JumpReLU release goes in the Gemma Scope 1 and 2 layouts (and int8), made unique among
  `entries` (two SAEs of one width can measure the same L0)."""
  npz_dir = gemma_scope_dir(root, config.site, width, l0, kind)
  gs2 = gemma_scope_2_dir(root, config.site, width, l0, kind)
  if any(e.files.get("gemma_scope") == str(npz_dir / "params.npz") for e in entries):
    npz_dir = npz_dir.with_name(f"{npz_dir.name}_{name}")
  if any(e.files.get("gemma_scope_2") == str(gs2) for e in entries):
    gs2 = gs2.with_name(f"{gs2.name}_{name}")
  files = {"gemma_scope": str(npz_dir / "params.npz"), "gemma_scope_2": str(gs2)}
  if config.export.int8:
    files["int8"] = str(root / "int8" / gs2.relative_to(root / "gemma-scope-2"))
  return files


def write_exports(root: Path, files_to_write: list, progress: bool = True) -> None:
  """Writes `(released SAE, entry, log10 densities)` in every format of each entry and the index
  of the entries, replacing `root` whole (no file of an older export survives outside the index)."""
  with staged_directory(root, "export") as staging:
    for released, e, density_log10 in tqdm(files_to_write, desc="write exports", disable=not progress):
      for key, where in e.files.items():
        sparsity = {"sparsity_log10": density_log10} if key == "saelens" else {}
        save_sae(released, staging / Path(where).relative_to(root), format=FORMAT_OF_KEY[key], **sparsity)
    (staging / "index.json").write_text(index_json([e for _, e, _ in files_to_write]))


def export(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  source: BatchSource | None = None,
  progress: bool = True,
) -> list[ExportEntry]:
  """Writes every SAE of the run's latest checkpoint; returns the index entries."""
  layout = RunLayout(workdir)
  if jax.process_index() == 0:
    check_replaceable(layout.export)  # an export/ scope_jax did not make is refused before the measuring
  kind, owns_source = kind_named(config.kind), source is None
  source = source or source_from_config(config, workdir, make_train_mesh(config))
  try:
    restored = restore_latest(workdir, config, source)
    state, groups, (scale, target_scale) = restored.state, restored.groups, restored.divisors
    step = int(state["step"])
    with traced_at(config.precision):
      densities = measure(state["params"], source, step, config.export.batches, groups, progress, kind.transcoder)
  finally:
    if owns_source:
      source.close()
  epochs = step * source.batch_size / source.describe()["rows"]  # every SAE of the sweep saw the same rows

  params = multihost_utils.process_allgather(state["params"], tiled=True)  # numpy, on every process
  params = [p.to_sae() for p in params]
  store = source.store  # a store knows where its activations came from
  model = store.model if store else config.model
  context = store.seq_len if store else config.data.context_size
  dataset = ",".join(store.text) if store else (config.data.dataset or config.data.path)
  root, entries, files_to_write = layout.export, [], []  # (released SAE, entry, its SAELens densities)
  for group, stack, density_sm in zip(groups, params, densities):
    for (value, seed), name, sae, density_m in zip(group.members, group.names, unstack(stack), density_sm):
      k = int(value) if group.ranked else None  # BatchTopK's k is its training's; it releases as a JumpReLU
      info = SAEInfo(
        site=config.site,
        model=model,
        context_size=context,
        dataset=dataset,
        l1_coefficient=None if group.ranked else value,
        target_site=config_target_site(config),
        prefixes=group.prefixes,
        activation="topk" if group.activation == "topk" else "jumprelu",
        k=k,
      )
      released = jax.tree.map(np.asarray, fold(sae, scale, target_scale)).replace(info=info)
      l0 = float(density_m.sum())
      lens = root / "saelens" / (f"{config.site}-{name}" if config.site else name)
      files = {"saelens": str(lens)}
      if group.activation != "topk":  # the JumpReLU formats (a TopK SAE has no threshold to release)
        files |= jumprelu_files(root, config, group.width, l0, kind, name, entries)
      if group.activation == "batchtopk":  # also as SAELens' BatchTopK training class
        files["saelens_batchtopk"] = str(root / "saelens-batchtopk" / lens.name)
      entries.append(
        ExportEntry(
          name=name,
          kind=config.kind,
          input_site=config.site,
          output_site=config_target_site(config) or config.site,
          prefixes=group.prefixes,
          width=group.width,
          l1_coefficient=info.l1_coefficient,
          seed=seed,
          step=step,
          l0=l0,
          dead_fraction=float(np.mean(density_m == 0)),
          scale=scale,
          target_scale=target_scale,
          epochs=epochs,
          measured_rows=config.export.batches * source.batch_size,
          files=files,
          activation=group.activation,
          k=k,
        )
      )
      files_to_write.append((released, entries[-1], np.log10(density_m + 1e-10)))
  if jax.process_index() == 0:
    layout.unmark("export")
    write_exports(root, files_to_write, progress)
    layout.mark_finished("export", export_identity(config, layout))
  multihost_utils.sync_global_devices("scope_jax export: files written")  # the next stage reads them
  return entries
