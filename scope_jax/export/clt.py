"""Exporting a CLT sweep: each CLT's latest checkpoint, its normalization folded back per site
(sae/clt.py `fold`), its L0 and dead latents per layer measured on batches after training, and its
files in circuit-tracer's and Gemma Scope 2's layouts (sae/clt_io.py), indexed in
`WORKDIR/export/clt_index.json`.

    entries = export_clt(config, workdir)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from scope_jax.core.kinds import clt_layers
from scope_jax.layout import RunLayout, export_identity, staged_directory
from scope_jax.sae.clt import CLT, CLTInfo, fold
from scope_jax.sae.clt_io import save_circuit_tracer, save_gemma_scope_2_clt
from scope_jax.train.clt_run import restore_clt

CLT_INDEX = "clt_index.json"


@jax.jit
def _fire_counts(params: CLT, x_bld: jax.Array) -> jax.Array:
  """`[S, L, F]`: how many rows fire each latent of each stacked CLT."""
  pre_slbf = jnp.einsum("bld,sldf->slbf", x_bld, params.W_enc) + params.b_enc[:, :, None, :]
  return jnp.sum(pre_slbf > params.threshold[:, :, None, :], axis=2, dtype=jnp.int32)


def measure_density(params: CLT, source, first_step: int, batches: int, progress: bool = True) -> np.ndarray:
  """`[S, L, F]` firing frequency of every latent on `batches` batches from `first_step` on."""
  counts = 0
  for s in tqdm(range(first_step, first_step + batches), desc="measure L0", disable=not progress):
    x_bld, _ = source.batch(s)
    counts = counts + np.asarray(_fire_counts(params, x_bld), np.int64)
  return counts / (batches * source.batch_size)


def export_clt(config: ml_collections.ConfigDict, workdir: str | Path, progress: bool = True) -> list[dict]:
  layout = RunLayout(workdir)
  state, sweep, source = restore_clt(config, workdir)
  try:
    step = int(state["step"])
    density_slf = measure_density(state["params"], source, step, config.export.batches, progress)
    input_scales, output_scales = source.divisors
    store = source.store
    rows = source.describe()["rows"]
  finally:
    source.close()
  params = jax.tree.map(np.asarray, state["params"])
  model = store.model if store else config.model
  layers = clt_layers(config)
  root, entries, to_write = layout.export, [], []
  for i, ((lam, seed), name) in enumerate(zip(sweep.members, sweep.names)):
    trained = jax.tree.map(lambda a, i=i: a[i], params)
    released = jax.tree.map(np.asarray, fold(trained, input_scales, output_scales))
    info = CLTInfo(model=model, first_layer=layers[0], layers=len(layers), l1_coefficient=lam)
    files = {"gemma_scope_2": str(root / "gemma-scope-2" / name)}
    if layers[0] == 0:  # circuit-tracer replaces every MLP from the first
      files["circuit_tracer"] = str(root / "circuit-tracer" / name)
    l0_l = density_slf[i].sum(axis=-1)
    entries.append(
      {
        "name": name,
        "kind": "clt",
        "layers": layers,
        "width": sweep.width,
        "l1_coefficient": lam,
        "seed": seed,
        "step": step,
        "l0": float(l0_l.sum()),
        "l0_per_layer": [float(v) for v in l0_l],
        "dead_fraction": float(np.mean(density_slf[i] == 0)),
        "dead_per_layer": [float(v) for v in np.mean(density_slf[i] == 0, axis=-1)],
        "input_scales": [float(v) for v in input_scales],
        "output_scales": [float(v) for v in output_scales],
        "epochs": step * sweep.batch_size / rows,
        "measured_rows": config.export.batches * sweep.batch_size,
        "files": files,
      }
    )
    to_write.append((released, info, files))
  if jax.process_index() == 0:
    layout.unmark("export")
    with staged_directory(root, "export") as staging:
      for released, info, files in tqdm(to_write, desc="write CLTs", disable=not progress):
        if "circuit_tracer" in files:
          save_circuit_tracer(released, info, staging / Path(files["circuit_tracer"]).relative_to(root))
        save_gemma_scope_2_clt(released, info, staging / Path(files["gemma_scope_2"]).relative_to(root))
      (staging / CLT_INDEX).write_text(json.dumps(entries, indent=1) + "\n")
    layout.mark_finished("export", export_identity(config, layout))
  return entries
