"""Gemma 2 parity with the real transformers implementation, sharding, splicing, bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import scope_jax as sj
from tests.helpers import hf_run, rel_err, tiny_gemma2, train_sentencepiece

SITES = ["att.0", "mlp_in.1", "mlp.1", "res.1", "att.2", "mlp_in.3", "mlp.3", "res.3"]


def one_device():
  return sj.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("gemma2")
  model = tiny_gemma2(path)
  tokens = np.random.default_rng(0).integers(0, 256, (3, 14))  # 14 > sliding window 5
  return path, model, tokens


@pytest.fixture(scope="module")
def lm(tiny):
  return sj.load_model(tiny[0], mesh=one_device())


def test_config_values_come_from_the_checkpoint(lm):
  c = lm.config
  assert (c.model_type, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (
    "gemma2",
    64,
    4,
    4,
    2,
    16,
    96,
  )
  assert (c.sliding_window, c.attn_logit_softcap, c.final_logit_softcap, c.query_pre_attn_scalar) == (5, 4.0, 2.0, 24)
  assert c.layer_types == ("sliding_attention", "full_attention") * 2
  assert c.rope_theta_global == c.rope_theta_local == 1000.0


def test_logits_and_sites_match_transformers(tiny, lm):
  _, model, tokens = tiny
  ref_logits, ref_acts = hf_run(model, tokens, SITES)
  # The final soft-cap (2.0) is deep in its non-linear range, so a wrong cap cannot pass.
  assert np.abs(ref_logits).max() > 0.9 * 2.0
  assert rel_err(lm.logits(tokens), ref_logits) <= 1e-4
  acts = lm.activations(tokens, SITES)
  assert acts["att.0"].shape == (3, 14, 4 * 16)
  for site in SITES:
    assert acts[site].dtype == jnp.float32
    assert rel_err(acts[site], ref_acts[site]) <= 1e-4, site


def test_attention_softcap_and_sliding_window_matter(tiny, lm):
  """Removing the attention cap or the window changes the logits: the test model exercises both."""
  path, model, tokens = tiny
  clean = np.asarray(lm.logits(tokens))
  for change in (dict(attn_logit_softcap=None), dict(sliding_window=None)):
    other = sj.load_model(path, mesh=one_device(), config=lm.config.replace(**change))
    assert rel_err(other.logits(tokens), clean) > 1e-2, change


def test_eight_devices_equal_one(tiny, lm):
  path, _, tokens = tiny
  lm8 = sj.load_model(path, mesh=sj.make_mesh(data=2, model=4))
  q = lm8._state["layers"][0]["attn"]["q"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert rel_err(lm8.logits(tokens), lm.logits(tokens)) <= 1e-5
  acts8, acts1 = lm8.activations(tokens, SITES), lm.activations(tokens, SITES)
  for site in SITES:
    assert rel_err(acts8[site], acts1[site]) <= 1e-5, site


def test_bfloat16_is_close_to_float32(tiny, lm):
  path, _, tokens = tiny
  lm16 = sj.load_model(path, mesh=one_device(), dtype=jnp.bfloat16)
  assert lm16._state["embed"][...].dtype == jnp.bfloat16
  logits = lm16.logits(tokens)
  assert logits.dtype == jnp.float32
  assert rel_err(logits, lm.logits(tokens)) < 5e-2


def test_bfloat16_matmul_precision_rounds_the_operands_and_stays_close(tiny, lm):
  """A float32 model at `precision="bfloat16"`: every matmul's operands rounded to bfloat16 (on CPU
  too), sums in float32; the logits stay close to transformers' float32 ones, and the float32
  precision gives them as the parity test does."""
  path, model, tokens = tiny
  fast = sj.load_model(path, mesh=one_device(), precision="bfloat16")
  reference, _ = hf_run(model, tokens, [])
  rounded, exact = np.asarray(fast.logits(tokens)), np.asarray(lm.logits(tokens))
  assert lm.precision == "float32" and rel_err(exact, reference) <= 1e-4
  assert rel_err(rounded, exact) > 1e-4  # really rounded
  assert rel_err(rounded, reference) < 3e-2
  losses = fast.token_losses_from_site(tokens, "res.1", *fast.to_site(tokens, "res.1")[:2])[: len(tokens)]
  np.testing.assert_allclose(np.asarray(losses), np.asarray(fast.token_losses(tokens)), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"precision 'fp8': expected one of \('float32', 'bfloat16'\)"):
    sj.load_model(path, mesh=one_device(), precision="fp8")


def test_replace_identity_and_zeros(tiny, lm):
  _, _, tokens = tiny
  clean = np.asarray(lm.logits(tokens))
  identity = np.asarray(lm.logits(tokens, replace={"res.1": lambda x: x, "att.2": lambda x: x}))
  np.testing.assert_allclose(identity, clean, rtol=0, atol=1e-6)
  zeroed = np.asarray(lm.logits(tokens, replace={"res.1": jnp.zeros_like}))
  assert rel_err(zeroed, clean) > 1e-2


@pytest.mark.parametrize("site", ["att.1", "mlp.2", "mlp_in.0", "res.2"])
def test_replace_matches_a_transformers_hook_edit(tiny, lm, site):
  """Splicing happens exactly where transformers' hook point is (att: before W_O)."""
  _, model, tokens = tiny
  ref, _ = hf_run(model, tokens, [], edit={site: lambda x: 0.5 * x})
  ours = lm.logits(tokens, replace={site: lambda x: 0.5 * x})
  assert rel_err(ours, ref) <= 1e-4


def test_a_replacement_read_from_another_site_matches_transformers_hooks(tiny, lm):
  """A transcoder's splice, `mlp.2 <- W(mlp_in.2)`, done by FromSite and by two transformers hooks
  (one keeps the MLP's normalized input, the other swaps the normalized output for W of it)."""
  _, model, tokens = tiny
  d = lm.config.d_model
  w_dd = np.random.default_rng(1).normal(0, d**-0.5, (d, d)).astype(np.float32)
  layer, kept = model.model.layers[2], {}
  hooks = [
    layer.pre_feedforward_layernorm.register_forward_hook(lambda m, args, out: kept.update(x=out)),
    layer.post_feedforward_layernorm.register_forward_hook(lambda m, args, out: kept["x"] @ torch.tensor(w_dd)),
  ]
  try:
    with torch.no_grad():
      ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  finally:
    for h in hooks:
      h.remove()
  predict = sj.FromSite("mlp_in.2", lambda x, _: x @ w_dd)
  ours = lm.logits(tokens, replace={"mlp.2": predict})
  assert rel_err(ours, ref) <= 1e-4 and rel_err(ours, lm.logits(tokens)) > 1e-2
  # the site's own activation is the second argument: keeping it is the clean forward
  same = lm.token_losses(tokens, replace={"mlp.2": sj.FromSite(sj.models.Site("mlp_in", 2), lambda x, y: y)})
  np.testing.assert_allclose(np.asarray(same), np.asarray(lm.token_losses(tokens)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
  "site, replacement, message",
  [
    ("mlp.2", sj.FromSite("mlp_in.1", lambda x, _: x), "earlier site of layer 2, one of \\['att.2', 'mlp_in.2'\\]"),
    ("mlp_in.2", sj.FromSite("mlp.2", lambda x, _: x), "earlier site of layer 2"),
    ("att.2", sj.FromSite("res.1", lambda x, _: x), "one of \\[\\]"),
    ("mlp.2", sj.FromSite("mlp_in.9", lambda x, _: x), "beyond the last layer"),
    ("mlp.2", 0.5, "replace\\['mlp.2'\\] is a float, expected a function or a FromSite"),
  ],
)
def test_a_bad_replacement_is_refused_naming_the_site(tiny, lm, site, replacement, message):
  with pytest.raises((ValueError, TypeError), match=message):
    lm.logits(tiny[2], replace={site: replacement})


@pytest.mark.parametrize("site", [None, "mlp.2"])
def test_token_losses_are_transformers_cross_entropy(tiny, lm, site):
  """The chunked logsumexp (vocabulary in chunks, soft-cap inside) against torch's cross-entropy of
  transformers' logits, clean and spliced."""
  _, model, tokens = tiny
  edit = {site: lambda x: 0.5 * x} if site else None
  ref_logits, _ = hf_run(model, tokens, [], edit=edit)
  ref = torch.nn.functional.cross_entropy(
    torch.tensor(ref_logits[:, :-1]).reshape(-1, 256), torch.tensor(tokens[:, 1:]).reshape(-1), reduction="none"
  ).reshape(3, 13)
  ours = lm.token_losses(tokens, replace={site: lambda x: 0.5 * x} if site else None)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-4, atol=1e-5)
  model = nnx.merge(lm._graphdef, lm._state)  # the vocabulary (256) in 8 chunks of 32 instead of 1
  sites = {sj.models.sites.parse_site(site, lm.config): lambda x: 0.5 * x} if site else None
  x_btd, _ = model._layers(jnp.asarray(tokens), (), sites, lm.config.n_layers - 1)
  np.testing.assert_allclose(
    np.asarray(model.next_token_losses(x_btd, jnp.asarray(tokens), vocab_chunk=40)), ref.numpy(), rtol=1e-4, atol=1e-5
  )


def test_activations_stop_after_the_deepest_site(tiny, tmp_path):
  """With NaN weights in the last layer, earlier sites are still finite: that layer never runs."""
  path, _, tokens = tiny
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  weights = load_file(broken / "model.safetensors")
  weights["model.layers.3.mlp.down_proj.weight"] = torch.full_like(
    weights["model.layers.3.mlp.down_proj.weight"], float("nan")
  )
  save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
  lm = sj.load_model(broken, mesh=one_device())
  assert np.isnan(np.asarray(lm.logits(tokens))).all()
  acts = lm.activations(tokens, ["res.2", "mlp.1"])
  assert all(np.isfinite(np.asarray(a)).all() for a in acts.values())


def test_batch_not_divisible_by_data_axis(tiny, lm):
  path, _, tokens = tiny
  lm8 = sj.load_model(path, mesh=sj.make_mesh(data=8))
  assert rel_err(lm8.logits(tokens[:3]), lm.logits(tokens[:3])) <= 1e-5


# --------------------------------------------------------------------------- google-deepmind layout


def to_deepmind(model, gating_layout: str) -> dict:
  """The tiny model's weights in google-deepmind/gemma's flat Flax layout."""
  c = model.config
  N, K, H, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  params = {
    "transformer/embedder": {
      "input_embedding": np.concatenate([sd["model.embed_tokens.weight"], np.zeros((128, D), np.float32)])
    },  # padded rows
    "transformer/final_norm": {"scale": sd["model.norm.weight"]},
  }
  for i in range(c.num_hidden_layers):
    p, q = f"model.layers.{i}.", f"transformer/layer_{i}/"
    gate, up = sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]  # [F, D]
    gating = np.stack([gate.T, up.T]) if gating_layout == "2b" else np.stack([gate, up])
    params.update(
      {
        q + "pre_attention_norm": {"scale": sd[p + "input_layernorm.weight"]},
        q + "post_attention_norm": {"scale": sd[p + "post_attention_layernorm.weight"]},
        q + "pre_ffw_norm": {"scale": sd[p + "pre_feedforward_layernorm.weight"]},
        q + "post_ffw_norm": {"scale": sd[p + "post_feedforward_layernorm.weight"]},
        q + "attn/q_einsum": {"w": sd[p + "self_attn.q_proj.weight"].reshape(N, H, D).transpose(0, 2, 1)},
        q + "attn/kv_einsum": {
          "w": np.stack([sd[p + f"self_attn.{x}_proj.weight"].reshape(K, H, D).transpose(0, 2, 1) for x in "kv"])
        },
        q + "attn/attn_vec_einsum": {"w": sd[p + "self_attn.o_proj.weight"].T.reshape(N, H, D)},
        q + "mlp/gating_einsum": {"w": gating},
        q + "mlp/linear": {"w": sd[p + "mlp.down_proj.weight"].T},
      }
    )
  return params


@pytest.mark.parametrize("gating_layout", ["2b", "9b"])
def test_deepmind_checkpoint_loads_to_the_same_logits(tiny, lm, tmp_path, gating_layout):
  import orbax.checkpoint as ocp

  _, model, tokens = tiny
  ckpt = tmp_path / "gemma2-tiny"
  ocp.PyTreeCheckpointer().save(ckpt, to_deepmind(model, gating_layout))
  dm = sj.load_model(ckpt, mesh=one_device(), config=lm.config)
  ref, _ = hf_run(model, tokens, [])
  assert rel_err(dm.logits(tokens), ref) <= 1e-4


def test_deepmind_checkpoint_without_config_names_the_problem(tiny, tmp_path):
  import orbax.checkpoint as ocp

  ckpt = tmp_path / "ckpt"
  ocp.PyTreeCheckpointer().save(ckpt, to_deepmind(tiny[1], "2b"))
  with pytest.raises(ValueError, match="matches no preset"):
    sj.load_model(ckpt, mesh=one_device())


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_beside_checkpoint(tiny, tmp_path):
  path = tmp_path / "with_tok"
  shutil.copytree(tiny[0], path)
  (path / "tokenizer.model").write_bytes(train_sentencepiece())
  lm = sj.load_model(path, mesh=one_device())
  tok = lm.tokenizer
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  ids = tok.encode("the lazy fox")
  assert ids[0] == tok.bos_id and len(ids) > 2
  assert tok.decode(ids[1:]) == "the lazy fox"
  assert tok.sp.IdToPiece(ids[1]).startswith("▁")


# --------------------------------------------------------------------------- bad input


def edit_checkpoint(src, dst, fn):
  shutil.copytree(src, dst)
  weights = load_file(dst / "model.safetensors")
  fn(weights)
  save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_missing_tensor(tiny, tmp_path):
  path = edit_checkpoint(tiny[0], tmp_path / "m", lambda w: w.pop("model.layers.2.self_attn.k_proj.weight"))
  with pytest.raises(ValueError, match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' is missing"):
    sj.load_model(path, mesh=one_device())


def test_wrong_shape(tiny, tmp_path):
  def shrink(w):
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:50]

  path = edit_checkpoint(tiny[0], tmp_path / "s", shrink)
  with pytest.raises(ValueError, match=r"up_proj\.weight' has shape \(50, 64\), expected \(96, 64\)"):
    sj.load_model(path, mesh=one_device())


def test_unknown_model_type(tiny, tmp_path):
  path = tmp_path / "llama"
  shutil.copytree(tiny[0], path)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
  with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
    sj.load_model(path, mesh=one_device())


def test_bad_sites(lm):
  tokens = np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match=r"layer 4 is beyond the last layer \(3\)"):
    lm.activations(tokens, ["res.4"])
  with pytest.raises(ValueError, match="'resid.1' is not of the form KIND.LAYER"):
    lm.activations(tokens, ["resid.1"])
  with pytest.raises(ValueError, match="beyond the last layer"):
    lm.logits(tokens, replace={"mlp.9": lambda x: x})


def test_token_outside_vocabulary(lm):
  tokens = np.zeros((2, 4), np.int32)
  tokens[1, 2] = 256
  with pytest.raises(ValueError, match=r"token id 256 at \[1, 2\] is outside the vocabulary \[0, 256\)"):
    lm.logits(tokens)


def test_mesh_that_does_not_divide_heads(tiny):
  with pytest.raises(ValueError, match="'model' of size 8 does not divide num_attention_heads=4"):
    sj.load_model(tiny[0], mesh=sj.make_mesh(model=8))


def test_missing_source(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sj.load_model(tmp_path / "nope")
