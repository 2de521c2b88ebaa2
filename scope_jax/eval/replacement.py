"""The replacement model: the MLPs of a layer range replaced by a CLT (or a per-layer transcoder
set read as one, sae/clt_io.py `load_transcoder_set`), as circuit-tracer's attribution graphs use it.

Each layer's MLP output becomes the dictionary's reconstruction from the latents read at that
layer's MLP input and every earlier one's, in the forward as replaced so far, at every position
but BOS (as SAEs are spliced, eval/statistics.py; circuit-tracer leaves position 0 to its error
node: BOS's MLP outputs are orders of magnitude larger than any text token's):

    mlp_in.ℓ  →  a^ℓ = JumpReLU(x^ℓ W_enc^ℓ + b_enc^ℓ)       ŷ^t = b_dec^t + Σ_{ℓ ≤ t} a^ℓ W_dec^ℓ[:, t - ℓ]

The forward runs in segments between sites (models/gemma.py `between`). Two measurements:

- **all at once**: every MLP of the range replaced in one forward: Δ LM loss ± SE over sequences,
  and each layer's FVU of ŷ^t against the MLP's own output on the replaced forward's input;
- **one layer at a time**: only layer t replaced (the latents before it read clean inputs): Δ loss
  ± SE and FVU per layer (on `eval.replacement_layer_sequences` sequences), and L0 per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax.eval.statistics import ratio_and_standard_error
from scope_jax.parallel.mesh import host_array
from scope_jax.sae.clt import CLT


@jax.jit
def _encode(W_enc_df, b_enc_f, threshold_f, x_btd) -> jax.Array:
  pre = jnp.einsum("btd,df->btf", x_btd.astype(jnp.float32), W_enc_df) + b_enc_f
  return jnp.where(pre > threshold_f, pre, 0.0)


@jax.jit
def _writes(a_btf, W_dec_fjd) -> jax.Array:
  """`[targets, B, T, d]`: what layer ℓ's latents write into layers ℓ, ℓ+1, …"""
  return jnp.einsum("btf,fjd->jbtd", a_btf, W_dec_fjd)


class _LayerSums:
  """Per layer: Σ||y - ŷ||², Σy, Σ||y||², active latents and tokens over the kept positions."""

  def __init__(self, layers: int):
    self.err, self.sq = np.zeros(layers), np.zeros(layers)
    self.sum = [0.0] * layers
    self.active, self.tokens = np.zeros(layers), np.zeros(layers)

  def add(self, i: int, y, yhat, a, keep_bt: np.ndarray) -> None:
    y, yhat = host_array(y)[: len(keep_bt)][keep_bt], host_array(yhat)[: len(keep_bt)][keep_bt]
    self.err[i] += float(np.sum(np.square(y.astype(np.float64) - yhat)))
    self.sq[i] += float(np.sum(np.square(y.astype(np.float64))))
    self.sum[i] = self.sum[i] + y.sum(axis=0, dtype=np.float64)
    self.active[i] += float(np.sum(host_array(a)[: len(keep_bt)][keep_bt] > 0))
    self.tokens[i] += float(keep_bt.sum())

  def fvu(self) -> list[float]:
    variance = self.sq - np.array([np.sum(np.square(s)) for s in self.sum]) / np.maximum(self.tokens, 1)
    return [float(v) for v in self.err / variance]

  def l0(self) -> list[float]:
    return [float(v) for v in self.active / np.maximum(self.tokens, 1)]


def replaced_forward(lm, clt: CLT, first_layer: int, tokens, replaced: set[int] | None, sums: _LayerSums, keep_bt):
  """Next-token losses `[B', T-1]` of the forward with the MLP outputs of dictionary layers
  `replaced` (indices into the range; None: all) replaced; adds each layer's reconstruction
  statistics (of the layers replaced, or all when None) to `sums`."""
  L = clt.layers
  resid, act, _ = lm.to_site(tokens, f"mlp_in.{first_layer}")
  pending = [jnp.broadcast_to(clt.b_dec[t], act.shape[:2] + clt.b_dec.shape[-1:]) for t in range(L)]
  for i in range(L):
    layer = first_layer + i
    a = _encode(clt.W_enc[i], clt.b_enc[i], clt.threshold[i], act)
    written = _writes(a, clt.W_dec[i])
    for j in range(written.shape[0]):
      pending[i + j] = pending[i + j] + written[j]
    resid, y = lm.between(resid, act, f"mlp_in.{layer}", f"mlp.{layer}")
    yhat = pending[i]
    on = replaced is None or i in replaced
    if on:
      sums.add(i, y, yhat, a, keep_bt)
    out = y.at[:, 1:].set(yhat[:, 1:].astype(y.dtype)) if on else y  # every position but BOS, as SAEs are spliced
    if i == L - 1:
      return lm.token_losses_from_site(tokens, f"mlp.{layer}", resid, out)
    if replaced is not None and i >= max(replaced):  # nothing later is replaced: finish the forward
      return lm.token_losses_from_site(tokens, f"mlp.{layer}", resid, out)
    resid, act = lm.between(resid, out, f"mlp.{layer}", f"mlp_in.{layer + 1}")
  raise AssertionError("unreachable")


def _sequence_sums(losses_bt, pred_bt: np.ndarray) -> np.ndarray:
  return np.sum(host_array(losses_bt)[: len(pred_bt)] * pred_bt, axis=1, dtype=np.float64)


def clean_sums(lm, token_batches: list) -> list[np.ndarray]:
  """Each batch's per-sequence sums of the clean forward's next-token losses (every dictionary's reference)."""
  return [_sequence_sums(lm.token_losses(batch.tokens), batch.keep[:, 1:]) for batch in token_batches]


def evaluate_replacement(
  lm, clt: CLT, first_layer: int, token_batches: list, clean: list[np.ndarray], layer_batches: int, bar=None
) -> dict:
  """The replacement model of `clt` (released units, layers `first_layer` …) on `token_batches`
  (all at once) and their first `layer_batches` (one layer at a time); `clean`: `clean_sums` of
  `token_batches`."""
  clt = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), clt)
  L = clt.layers
  if first_layer + L > lm.config.n_layers:
    raise ValueError(
      f"a dictionary of layers {first_layer}-{first_layer + L - 1}; model {lm.source} has layers "
      f"0-{lm.config.n_layers - 1}"
    )
  spliced, counts, all_sums = [], [], _LayerSums(L)
  for batch in token_batches:
    pred_bt = batch.keep[:, 1:]
    losses = replaced_forward(lm, clt, first_layer, batch.tokens, None, all_sums, batch.keep)
    spliced.append(_sequence_sums(losses, pred_bt))
    counts.append(pred_bt.sum(axis=1).astype(np.float64))
    if bar is not None:
      bar.update(1)
  count = np.concatenate(counts)
  delta, delta_se = ratio_and_standard_error(np.concatenate(spliced) - np.concatenate(clean), count)
  out = {
    "layers": list(range(first_layer, first_layer + L)),
    "ce_clean": float(np.concatenate(clean).sum() / count.sum()),
    "ce_replaced": float(np.concatenate(spliced).sum() / count.sum()),
    "delta_loss": delta,
    "delta_loss_se": delta_se,
    "fvu_per_layer_replaced": all_sums.fvu(),
    "l0_per_layer_replaced": all_sums.l0(),
  }
  single_sums, deltas, ses = _LayerSums(L), [], []
  layer_clean, layer_count = np.concatenate(clean[:layer_batches]), np.concatenate(counts[:layer_batches])
  for i in range(L):
    spliced_i = []
    for batch in token_batches[:layer_batches]:
      losses = replaced_forward(lm, clt, first_layer, batch.tokens, {i}, single_sums, batch.keep)
      spliced_i.append(_sequence_sums(losses, batch.keep[:, 1:]))
      if bar is not None:
        bar.update(1)
    d, se = ratio_and_standard_error(np.concatenate(spliced_i) - layer_clean, layer_count)
    deltas.append(d)
    ses.append(se)
  return out | {
    "delta_loss_per_layer": deltas,
    "delta_loss_se_per_layer": ses,
    "fvu_per_layer": single_sums.fvu(),
    "l0_per_layer": single_sums.l0(),
    "l0": float(np.sum(single_sums.l0())),
  }


def run_clt_eval(config, workdir, lm=None, progress: bool = True) -> dict:
  """Evaluates every exported CLT of the run (and each dictionary of `eval.compare_with`: a
  transcoder set or a CLT directory) as a replacement model on the held-out text; writes
  `report/replacement.json` and `report/report.md`."""
  import json
  from pathlib import Path

  from tqdm.auto import tqdm

  from scope_jax.activations.extract import load_extraction_model
  from scope_jax.eval.evaluate import eval_batches
  from scope_jax.export.clt import CLT_INDEX
  from scope_jax.layout import RunLayout, check_replaceable, eval_identity, staged_directory
  from scope_jax.sae.clt_io import load_replacement

  layout = RunLayout(workdir)
  index = layout.export / CLT_INDEX
  if not index.exists():
    raise FileNotFoundError(f"{index}: no exported CLTs to evaluate; run `scope-jax export` first")
  dictionaries = {e["name"]: e["files"]["gemma_scope_2"] for e in json.loads(index.read_text())}
  for path in config.eval.compare_with:
    dictionaries[Path(path).name] = path
  if jax.process_index() == 0:
    check_replaceable(layout.report)
    layout.unmark("eval")
  lm = lm or load_extraction_model(config)
  token_batches = eval_batches(config, lm.tokenizer)
  layer_batches = -(-config.eval.replacement_layer_sequences // config.eval.batch_size)
  clean = clean_sums(lm, token_batches)
  results = {}
  for name, path in dictionaries.items():
    clt, info, kind = load_replacement(path)
    steps = len(token_batches) + clt.layers * min(layer_batches, len(token_batches))
    with tqdm(total=steps, desc=f"eval {name} as the replacement model", disable=not progress) as bar:
      results[name] = {"kind": kind, "path": str(path)} | evaluate_replacement(
        lm, clt, info.first_layer, token_batches, clean, layer_batches, bar
      )
  files = {}
  if jax.process_index() == 0:
    with staged_directory(layout.report, "report") as staging:
      (staging / "replacement.json").write_text(json.dumps(results, indent=1) + "\n")
      (staging / "report.md").write_text(replacement_report(results, config.model))
    files = {"json": layout.report / "replacement.json", "md": layout.report / "report.md"}
    layout.mark_finished("eval", eval_identity(config, layout))
  return {"results": results, "files": files}


def replacement_report(results: dict, model: str) -> str:
  """report.md: each dictionary as a replacement model, then per layer."""
  lines = [
    f"# scope_jax replacement models: {model}",
    "",
    "Every MLP of the range replaced at once (Δ LM loss ± SE over sequences), and each layer alone.",
    "",
    "| dictionary | kind | layers | L0 (all layers) | Δ loss, all replaced | mean FVU (alone) "
    "| mean FVU (all replaced) |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    layers = f"{r['layers'][0]}-{r['layers'][-1]}"
    lines.append(
      f"| {name} | {r['kind']} | {layers} | {r['l0']:.1f} | {r['delta_loss']:.3f} ± {r['delta_loss_se']:.3f} | "
      f"{np.mean(r['fvu_per_layer']):.3f} | {np.mean(r['fvu_per_layer_replaced']):.3f} |"
    )
  for name, r in results.items():
    lines += [
      "",
      f"## {name}",
      "",
      "| layer | L0 | FVU (alone) | FVU (all replaced) | Δ loss (alone) |",
      "|---|---|---|---|---|",
    ]
    for i, layer in enumerate(r["layers"]):
      fvu, fvu_replaced = r["fvu_per_layer"][i], r["fvu_per_layer_replaced"][i]
      delta, se = r["delta_loss_per_layer"][i], r["delta_loss_se_per_layer"][i]
      lines.append(
        f"| {layer} | {r['l0_per_layer'][i]:.1f} | {fvu:.3f} | {fvu_replaced:.3f} | {delta:.3f} ± {se:.3f} |"
      )
  return "\n".join(lines) + "\n"
