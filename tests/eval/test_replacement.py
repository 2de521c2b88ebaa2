"""The replacement model (eval/replacement.py) against transformers: a tiny Gemma 3 whose MLP
outputs are replaced (every position but BOS), through forward hooks, by a CLT's reconstruction
from the MLP inputs the hooked forward itself produced."""

import jax
import numpy as np
import pytest
import torch

import scope_jax as sj
from scope_jax.eval.replacement import _LayerSums, replaced_forward
from scope_jax.parallel.mesh import make_mesh
from scope_jax.sae.clt import init_clt
from tests.helpers import tiny_gemma3


def random_clt(layers, d, width, seed=0):
  clt = init_clt(jax.random.key(seed), layers, d, d, width, 0.0, np.zeros((layers, d)))
  rng = np.random.default_rng(seed)
  return clt.replace(
    W_enc=np.asarray(clt.W_enc) * 0.5,
    b_enc=rng.normal(size=(layers, width)).astype(np.float32) * 0.1,
    threshold=np.abs(rng.normal(size=(layers, width))).astype(np.float32) * 0.2,
    W_dec=tuple(np.asarray(w) * 2.0 for w in clt.W_dec),
    b_dec=rng.normal(size=(layers, d)).astype(np.float32) * 0.1,
  )


def hooked_losses(model, tokens, clt, first, replaced):
  """Next-token losses of transformers' forward with MLP outputs of `replaced` (range indices)
  set to the CLT's reconstruction from the hooked forward's own MLP inputs."""
  layers = model.model.layers
  inputs, handles = {}, []
  t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)

  def read(i):
    def hook(module, args, out):
      inputs[i] = out

    return hook

  def write(i):
    def hook(module, args, out):
      if i not in replaced:
        return None
      yhat = t(clt.b_dec[i])
      for s in range(i + 1):
        pre = inputs[s] @ t(clt.W_enc[s]) + t(clt.b_enc[s])
        a = torch.where(pre > t(clt.threshold[s]), pre, torch.zeros_like(pre))
        yhat = yhat + a @ t(clt.W_dec[s][:, i - s])
      return torch.cat([out[:, :1], yhat[:, 1:]], dim=1)  # BOS keeps the MLP's own output

    return hook

  for i in range(clt.layers):
    handles.append(layers[first + i].pre_feedforward_layernorm.register_forward_hook(read(i)))
    handles.append(layers[first + i].post_feedforward_layernorm.register_forward_hook(write(i)))
  try:
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.double()
  finally:
    for h in handles:
      h.remove()
  logp = torch.log_softmax(logits, dim=-1)[:, :-1]
  return -torch.gather(logp, 2, torch.as_tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0].numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_gemma3")
  model = tiny_gemma3(path)
  return model, sj.load_model(path, mesh=make_mesh(data=1, model=1, devices=jax.devices()[:1]))


@pytest.mark.parametrize("replaced", [None, {0}, {2}], ids=["all", "first-layer-alone", "last-layer-alone"])
def test_the_replacement_forward_matches_transformers_with_hooks(tiny, replaced):
  model, lm = tiny
  first, layers = 1, 3
  clt = random_clt(layers, 64, 48)
  tokens = np.random.default_rng(1).integers(0, 256, (2, 16))
  ours = np.asarray(replaced_forward(lm, clt, first, tokens, replaced, _LayerSums(layers), np.ones((2, 16), bool)))[:2]
  want = hooked_losses(model, tokens, clt, first, set(range(layers)) if replaced is None else replaced)
  clean = np.asarray(lm.token_losses(tokens))
  assert np.abs(want - clean).max() > 1e-2, "the replacement must change the losses, or nothing is tested"
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
