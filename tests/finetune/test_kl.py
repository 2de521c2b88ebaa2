"""The KL finetuning step against jax.grad of the loss written on the whole forward (the model run
from its tokens, the SAE spliced in by `replace`), on tiny Gemma 2 and Gemma 3; α as defined; the
model's parameters untouched."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scope_jax as sj
from scope_jax.finetune import kl
from scope_jax.models.gemma import FromSite
from scope_jax.models.sites import Site, parse_site
from scope_jax.sae.jumprelu import heaviside, jumprelu
from scope_jax.sae.model import init_sae, init_transcoder
from scope_jax.sae.topk import topk_mask
from tests.helpers import tiny_gemma2, tiny_gemma3

BANDWIDTH, LAMBDA = 0.05, 2e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A tiny random Gemma 2 and Gemma 3, loaded."""
  out = {}
  for family, make in (("gemma2", tiny_gemma2), ("gemma3", tiny_gemma3)):
    path = tmp_path_factory.mktemp(family)
    make(path, seed=3)
    out[family] = sj.load_model(path)
  return out


def _tokens_and_keep(vocab: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (8, 12)).astype(np.int32)
  tokens[:, 0] = 2  # BOS
  keep = np.ones(tokens.shape, bool)
  keep[0, 9:] = keep[3, 5:] = False  # padding at the end of two sequences
  tokens[~keep] = 0
  return tokens, keep


def _sae(d: int, transcoder: bool):
  key = jax.random.key(1)
  if transcoder:
    sae = init_transcoder(key, d, d, 48, 0.05, jnp.zeros(d), skip=True)
    sae = sae.replace(W_skip=0.1 * jax.random.normal(jax.random.key(2), sae.W_skip.shape))
  else:
    sae = init_sae(key, d, 48, 0.05)
  return sae.replace(b_enc=0.02 * jax.random.normal(jax.random.key(3), (48,)), b_dec=jnp.full((d,), 0.1))


def _reference(sae, model, tokens, keep, spec: kl.KLSpec, input_site: Site):
  """The loss written on the whole forward: the clean and the spliced forward from the tokens
  (`replace`), the full logits; returns (loss, (KL, MSE))."""
  site = spec.site
  clean_logits, acts = model(jnp.asarray(tokens), capture=(input_site, site))
  x = acts[input_site] / spec.scale
  pre = (x if spec.transcoder else x - sae.b_dec) @ sae.W_enc + sae.b_enc
  if spec.k is None:
    f = jumprelu(pre, sae.threshold, BANDWIDTH)
  else:  # TopK: each position's k largest pre-activations, no sparsity term
    f = jnp.where(topk_mask(pre.reshape(-1, pre.shape[-1]), spec.k).reshape(pre.shape), jax.nn.relu(pre), 0.0)
  recon = f @ sae.W_dec + sae.b_dec + sae.skip(x)
  splice = lambda act: act.at[:, 1:].set(recon[:, 1:] * spec.target_scale)
  replace = {site: FromSite(input_site, lambda _, act: splice(act)) if spec.transcoder else splice}
  spliced_logits, _ = model(jnp.asarray(tokens), replace=replace)
  p = jax.nn.softmax(clean_logits[:, :-1], -1)
  kl_bt = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(spliced_logits[:, :-1], -1)), -1)
  pred = keep[:, 1:]
  kl_value = jnp.sum(kl_bt * pred) / pred.sum()
  text = keep.copy()
  text[:, 0] = False
  mse = jnp.sum(jnp.sum(jnp.square(recon - acts[site] / spec.target_scale), -1) * text) / text.sum()
  l0 = jnp.sum(jnp.sum(heaviside(pre, sae.threshold, BANDWIDTH), -1) * text) / text.sum()
  a = jax.lax.stop_gradient(mse / kl_value)
  return 0.5 * (a * kl_value + mse) + (LAMBDA * l0 if spec.k is None else 0.0), (kl_value, mse)


def _batch(lm, tokens, keep, spec: kl.KLSpec, input_site: Site) -> kl.Batch:
  resid, act, _ = lm.to_site(tokens, spec.site.name)
  text = keep.astype(np.float32)
  text[:, 0] = 0
  return kl.Batch(
    resid_btd=resid,
    act_btd=act,
    input_btd=lm.to_site(tokens, input_site.name)[1],
    clean_logp_btv=kl.clean_log_probs(nnx.merge(*lm.parts()), resid, act, spec.site),
    keep_bt=jnp.asarray(text),
    pred_bt=jnp.asarray(keep[:, 1:].astype(np.float32)),
  )


def _case(kind: str):
  if kind == "skip-transcoder":
    spec = kl.KLSpec(parse_site("mlp.2"), scale=3.0, target_scale=2.0, transcoder=True, bandwidth=BANDWIDTH)
    return spec, parse_site("mlp_in.2")
  spec = kl.KLSpec(parse_site("res.2"), scale=2.0, target_scale=2.0, bandwidth=BANDWIDTH)
  return dataclasses.replace(spec, k=8 if kind == "topk" else None), parse_site("res.2")


@pytest.mark.parametrize(
  "family, kind", [("gemma2", "sae"), ("gemma3", "sae"), ("gemma3", "skip-transcoder"), ("gemma3", "topk")]
)
def test_the_kl_loss_gradient_equals_jax_grad_through_the_whole_forward(models, family, kind):
  lm, transcoder = models[family], kind == "skip-transcoder"
  tokens, keep = _tokens_and_keep(lm.config.vocab_size)
  spec, input_site = _case(kind)
  sae, model = _sae(lm.config.d_model, transcoder), nnx.merge(*lm.parts())
  (loss, terms), grads = jax.value_and_grad(kl.kl_loss, has_aux=True)(
    sae, model, spec, _batch(lm, tokens, keep, spec, input_site), jnp.float32(LAMBDA), jnp.float32(0), True
  )
  reference = lambda s: _reference(s, model, tokens, keep, spec, input_site)
  (ref_loss, (ref_kl, ref_mse)), ref_grads = jax.value_and_grad(reference, has_aux=True)(sae)
  assert float(terms["kl"]) == pytest.approx(float(ref_kl), rel=1e-4) and float(ref_kl) > 1e-3
  assert float(terms["mse"]) == pytest.approx(float(ref_mse), rel=1e-5)
  assert float(terms["alpha"]) == pytest.approx(float(ref_mse / ref_kl), rel=1e-4)  # α = MSE / KL
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  assert float(terms["l0"]) == pytest.approx(8) if kind == "topk" else 0 < float(terms["l0"]) < 48
  for name in sae.names:
    if kind == "topk" and name == "threshold":
      continue  # TopK reads no threshold
    g, r = np.asarray(getattr(grads, name)), np.asarray(getattr(ref_grads, name))
    assert np.abs(r).max() > 0, name  # every parameter is trained by the loss
    np.testing.assert_allclose(g, r, rtol=2e-3, atol=2e-4 * np.abs(r).max(), err_msg=name)


def test_alpha_rules_and_the_model_left_untouched(models):
  """ "batch": α is each step's MSE / KL; "first": the first step's, held. The model's parameters
  are bit-identical after the steps (they are read, never donated or updated)."""
  lm = models["gemma2"]
  tokens, keep = _tokens_and_keep(lm.config.vocab_size)
  spec, input_site = _case("sae")
  params_before = [np.array(x) for x in jax.tree.leaves(lm.parts()[1])]
  model, batch = nnx.merge(*lm.parts()), _batch(lm, tokens, keep, spec, input_site)
  tx = kl.optimizer(1e-2, 4, 0, "constant", 0.0, 0.999, 0.0)
  for rule in ("batch", "first"):
    rule_spec = dataclasses.replace(spec, alpha_rule=rule)
    step = kl.jitted_step(rule_spec, tx, lm.precision, lm.parts()[0])
    state = kl.init_state(_sae(lm.config.d_model, False), tx, LAMBDA)
    alphas = []
    for _ in range(3):
      _, (ref_kl, ref_mse) = _reference(state["sae"], model, tokens, keep, rule_spec, input_site)
      state, terms = step(state, lm.parts()[1], batch)  # donates the state
      alphas.append(float(terms["alpha"]))
      if rule == "batch":
        assert alphas[-1] == pytest.approx(float(ref_mse / ref_kl), rel=1e-4)
    assert float(state["alpha"]) == alphas[-1]
    if rule == "first":
      assert alphas[0] == alphas[1] == alphas[2]
    else:
      assert alphas[0] != alphas[2]  # the SAE moved: α follows it
    np.testing.assert_allclose(np.linalg.norm(state["sae"].W_dec, axis=-1), 1.0, rtol=1e-5)  # training's constraint
  for before, after in zip(params_before, jax.tree.leaves(lm.parts()[1])):
    np.testing.assert_array_equal(before, np.asarray(after))


def test_hold_l0_steers_lambda_toward_the_first_steps_l0(models):
  """λ ← λ · exp(gain · (L0 / L0₁ − 1)) each step: up while L0 is above the first step's, down below."""
  lm = models["gemma3"]
  tokens, keep = _tokens_and_keep(lm.config.vocab_size)
  spec, input_site = _case("sae")
  spec = dataclasses.replace(spec, sparsity_rule="hold_l0", l0_gain=0.5)
  tx = kl.optimizer(3e-2, 6, 0, "constant", 0.0, 0.999, 0.0)
  step = kl.jitted_step(spec, tx, lm.precision, lm.parts()[0])
  state, batch = kl.init_state(_sae(lm.config.d_model, False), tx, LAMBDA), _batch(lm, tokens, keep, spec, input_site)
  l0s, lambdas = [], [LAMBDA]
  for _ in range(5):
    state, terms = step(state, lm.parts()[1], batch)
    l0s.append(float(terms["l0"]))
    lambdas.append(float(state["lambda"]))
  assert float(state["l0_target"]) == l0s[0] and len(set(l0s)) > 1  # L0 moved under the KL gradient
  for l0, before, after in zip(l0s, lambdas, lambdas[1:]):
    assert after == pytest.approx(before * np.exp(0.5 * (l0 / l0s[0] - 1)), rel=1e-5)
