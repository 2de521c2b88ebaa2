"""The KL finetuning loss and step (docs/recipe.md §15): an SAE spliced into the frozen model,
trained to keep the model's next-token distribution.

    KL    = mean over predicted text positions of KL(p_clean ‖ p_spliced), over the whole vocabulary
    MSE   = mean over text positions (BOS excluded) of ||y - ŷ||², in training units (y / C)
    α     = stopgrad(MSE / KL)                 (rule "batch": every step; "first": the first step's, held)
    loss  = ½ (α · KL + MSE) + λ · mean S(||f||₀)

α makes the two terms equal in value, so the loss is on the reconstruction loss's scale and λ keeps
the meaning it had in training: the SAE keeps its L0 unless the KL gradient moves it. With
`sparsity = "hold_l0"` λ follows a multiplicative controller toward the L0 of the first step
instead (λ ← λ · exp(gain · (L0 / L0₀ − 1))). The SAE is in its training form (sae/model.py: unit-norm
decoder rows, the divisor C folded out) and its decoder constraint is training's: the decoder
gradient is projected off its rows before Adam, the rows renormalized after. A TopK SAE has no
sparsity term (its k fixes L0). A transcoder predicts its target (the MLP's output) from its input
site; the prediction is spliced at the target.

The model runs inside the step from `to_site`'s residual: the layers up to the site ran once per
batch outside it (shared by every SAE there), as did the clean forward's log-probabilities; the
gradient flows through the layers after the site and the unembedding back to the SAE only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from scope_jax.core.choices import SCHEDULES
from scope_jax.models.sites import Site
from scope_jax.parallel.precision import at_precision
from scope_jax.sae.jumprelu import heaviside, jumprelu
from scope_jax.sae.loss import LossSpec
from scope_jax.sae.model import SAE, training_pre
from scope_jax.sae.topk import topk_mask


@dataclasses.dataclass(frozen=True)
class KLSpec:
  """What one SAE's finetuning step computes (static: each distinct spec compiles once)."""

  site: Site  # where the reconstruction is spliced (a transcoder's target)
  scale: float  # C of the SAE's input: training form reads input / C
  target_scale: float  # C of what it reconstructs (an SAE's own input: the same C)
  transcoder: bool = False
  k: int | None = None  # a TopK SAE's latents per token; None: JumpReLU
  bandwidth: float = 0.001  # ε of the pseudo-derivatives (training's)
  sparsity_loss: str = "l0"  # S: "l0" or "quadratic" (Gemma Scope 2's, around `target_l0`)
  target_l0: float | None = None
  alpha_rule: str = "batch"
  sparsity_rule: str = "keep"
  l0_gain: float = 0.05  # the "hold_l0" controller's step in log λ per unit of relative L0 error


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch at one site, on the devices, shared by every SAE there."""

  resid_btd: jax.Array  # to_site's residual at the (output) site
  act_btd: jax.Array  # the output site's activation: what the SAE reconstructs and replaces
  input_btd: jax.Array  # the SAE's input (act_btd itself for an SAE)
  clean_logp_btv: jax.Array  # float32 [B, T-1, V]: the clean forward's next-token log-probabilities
  keep_bt: jax.Array  # float32: text positions, BOS excluded (where MSE and L0 are averaged)
  pred_bt: jax.Array  # float32 [B, T-1]: predictions of text tokens (where KL is averaged)


def clean_log_probs(model, resid_btd: jax.Array, act_btd: jax.Array, site: Site) -> jax.Array:
  """float32 `[B, T-1, V]` next-token log-probabilities of the unspliced forward from `site`."""
  logits_btv = model.unembed(model.resid_from_site(resid_btd, act_btd, site))[:, :-1]
  return jax.nn.log_softmax(logits_btv, axis=-1)


def _latents(spec: KLSpec, sae: SAE, pre_btm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(latents, L0 per position) of the training form's pre-activations."""
  if spec.k is not None:
    keep = topk_mask(pre_btm.reshape(-1, pre_btm.shape[-1]), spec.k).reshape(pre_btm.shape)
    f_btm = jnp.where(keep, jax.nn.relu(pre_btm), 0.0)
    return f_btm, jnp.sum(jax.lax.stop_gradient(f_btm) > 0, axis=-1).astype(jnp.float32)
  f_btm = jumprelu(pre_btm, sae.threshold, spec.bandwidth)
  return f_btm, jnp.sum(heaviside(pre_btm, sae.threshold, spec.bandwidth), axis=-1)


def _masked_mean(x, weights) -> jax.Array:
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_loss(
  sae: SAE, model, spec: KLSpec, batch: Batch, lam: jax.Array, alpha: jax.Array, first: jax.Array
) -> tuple[jax.Array, dict]:
  """The finetuning loss of `sae` (training form) spliced into `model` (an nnx Gemma), and its
  terms. `alpha` is used only under the "first" rule after the first step (`first` False)."""
  x_btd = batch.input_btd.astype(jnp.float32) / spec.scale
  target_btd = batch.act_btd.astype(jnp.float32) / spec.target_scale
  pre_btm = training_pre(sae, x_btd, spec.transcoder)
  f_btm, l0_bt = _latents(spec, sae, pre_btm)
  recon_btd = sae.decode(f_btm) + sae.skip(x_btd)
  mse = _masked_mean(jnp.sum(jnp.square(recon_btd - target_btd), axis=-1), batch.keep_bt)
  spliced_btd = batch.act_btd.at[:, 1:].set((recon_btd[:, 1:] * spec.target_scale).astype(batch.act_btd.dtype))
  logits_btv = model.unembed(model.resid_from_site(batch.resid_btd, spliced_btd, spec.site))[:, :-1]
  logq_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  kl_bt = jnp.sum(jnp.exp(batch.clean_logp_btv) * (batch.clean_logp_btv - logq_btv), axis=-1)
  kl = _masked_mean(kl_bt, batch.pred_bt)
  measured = jax.lax.stop_gradient(mse / jnp.maximum(kl, 1e-12))
  a = measured if spec.alpha_rule == "batch" else jnp.where(first, measured, alpha)
  loss = 0.5 * (a * kl + mse)
  if spec.k is None:
    penalty_bt = LossSpec(sparsity_loss=spec.sparsity_loss, target_l0=spec.target_l0).penalty(l0_bt)  # training's S
    loss = loss + lam * _masked_mean(penalty_bt, batch.keep_bt)
  terms = {"loss": loss, "kl": kl, "mse": mse, "l0": _masked_mean(jax.lax.stop_gradient(l0_bt), batch.keep_bt)}
  return loss, terms | {"alpha": a, "lambda": lam}


def optimizer(lr: float, steps: int, warmup_steps: int, schedule: str, b1: float, b2: float, clip: float):
  """Adam behind a linear warm-up, then constant or linear decay to 0 at `steps`; optionally the
  gradient's global norm clipped first."""
  if schedule not in SCHEDULES:
    raise ValueError(f"finetune.schedule {schedule!r}: expected one of {SCHEDULES}")
  warm = optax.linear_schedule(0.1 * lr, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
  rest = optax.linear_schedule(lr, 0.0, steps - warmup_steps) if schedule == "linear" else optax.constant_schedule(lr)
  rate = optax.join_schedules([warm, rest], [warmup_steps])
  adam = optax.adam(rate, b1=b1, b2=b2)
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip else adam


def init_state(sae: SAE, tx: optax.GradientTransformation, lam: float) -> dict:
  """One SAE's finetuning state: its parameters, Adam's, λ and α (set by the first step)."""
  return {
    "sae": sae,
    "opt": tx.init(sae),
    "lambda": jnp.float32(lam),
    "alpha": jnp.float32(0.0),
    "l0_target": jnp.float32(0.0),
    "step": jnp.int32(0),
  }


def _project_decoder(grads: SAE, sae: SAE) -> SAE:
  """The decoder gradient with its component along each (unit) row removed, as training does."""
  g_md = grads.W_dec - jnp.sum(grads.W_dec * sae.W_dec, axis=-1, keepdims=True) * sae.W_dec
  return grads.replace(W_dec=g_md)


def _unit_rows(sae: SAE) -> SAE:
  norm_m = jnp.linalg.norm(sae.W_dec, axis=-1, keepdims=True)
  return sae.replace(W_dec=sae.W_dec / jnp.maximum(norm_m, 1e-12), threshold=jnp.maximum(sae.threshold, 0.0))


def step(state: dict, params: nnx.State, batch: Batch, graphdef: nnx.GraphDef, spec: KLSpec, tx):
  """One finetuning step of one SAE in the model `(graphdef, params)`: (new state, the loss's
  terms before the update)."""
  model = nnx.merge(graphdef, params)
  first = state["step"] == 0
  (_, terms), grads = jax.value_and_grad(kl_loss, has_aux=True)(
    state["sae"], model, spec, batch, state["lambda"], state["alpha"], first
  )
  grads = _project_decoder(grads, state["sae"])
  updates, opt = tx.update(grads, state["opt"], state["sae"])
  sae = _unit_rows(optax.apply_updates(state["sae"], updates))
  l0_target = jnp.where(first, terms["l0"], state["l0_target"])
  lam = state["lambda"]
  if spec.sparsity_rule == "hold_l0" and spec.k is None:
    lam = lam * jnp.exp(spec.l0_gain * (terms["l0"] / jnp.maximum(l0_target, 1e-6) - 1.0))
  new = {"sae": sae, "opt": opt, "lambda": lam, "alpha": terms["alpha"], "l0_target": l0_target}
  return new | {"step": state["step"] + 1}, terms


def jitted_step(spec: KLSpec, tx: optax.GradientTransformation, precision: str, graphdef: nnx.GraphDef):
  """`step(state, params, batch)` for `spec`, jitted at the model's matmul precision; the state is donated."""
  return jax.jit(
    at_precision(precision, functools.partial(step, graphdef=graphdef, spec=spec, tx=tx)), donate_argnums=(0,)
  )
