"""Matching latents across SAEs and splitting trees, on SAEs built with a known answer."""

import jax.numpy as jnp
import numpy as np
import pytest

from scope_jax.activations.store import open_store
from scope_jax.analysis.matching import activation_correlations, assign, children, decoder_cosines
from scope_jax.sae import SAE
from tests.data.stores import SITE, write_store


def unit_rows(a):
  return a / np.linalg.norm(a, axis=1, keepdims=True)


def sae_from(w_dec_md: np.ndarray, threshold=0.2) -> SAE:
  """An SAE whose encoder reads along its decoder directions (columns 0, 1 of the test store hold
  row ids and are not read)."""
  w = np.asarray(w_dec_md, np.float32)
  w_enc = w.T.copy()
  w_enc[:2] = 0.0
  m, d = w.shape
  return SAE(
    W_enc=jnp.asarray(w_enc),
    b_enc=jnp.zeros(m),
    W_dec=jnp.asarray(w),
    b_dec=jnp.zeros(d),
    threshold=jnp.full((m,), threshold),
  )


def permuted(sae: SAE, perm) -> SAE:
  return sae.replace(
    W_enc=sae.W_enc[:, perm], b_enc=sae.b_enc[perm], W_dec=sae.W_dec[perm], threshold=sae.threshold[perm]
  )


def test_an_sae_matched_against_itself_permuted_recovers_the_permutation_by_both_measures(tmp_path):
  write_store(tmp_path, shard_rows=(1_500,), width=16, doc_rows=50)
  store = open_store(str(tmp_path))
  rng = np.random.default_rng(0)
  sae = sae_from(unit_rows(rng.normal(size=(40, 16))))
  perm = rng.permutation(40)
  other = permuted(sae, perm)  # other's latent j is sae's latent perm[j]
  by_decoder = assign(decoder_cosines(sae, other))
  np.testing.assert_array_equal(perm[by_decoder.b], by_decoder.a)
  np.testing.assert_allclose(by_decoder.score, 1.0, atol=1e-5)
  corr = activation_correlations(store, sae, SITE, other, SITE, chunk_rows=400, progress=False)
  by_activation = assign(corr)
  np.testing.assert_array_equal(perm[by_activation.b], by_activation.a)
  np.testing.assert_allclose(by_activation.score, 1.0, atol=1e-4)


def test_a_noisy_copy_is_matched_for_at_least_95_percent_of_latents():
  rng = np.random.default_rng(1)
  w = unit_rows(rng.normal(size=(512, 64)))
  perm = rng.permutation(512)
  noisy = unit_rows(w[perm] + 0.08 * rng.normal(size=w.shape))
  m = assign(decoder_cosines(sae_from(w), sae_from(noisy)))
  assert np.mean(perm[m.b] == m.a) >= 0.95
  # noise as large as the signal matches nearly nothing: the test can fail
  lost = assign(decoder_cosines(sae_from(w), sae_from(unit_rows(w[perm] + 1.5 * rng.normal(size=w.shape)))))
  assert np.mean(perm[lost.b] == lost.a) < 0.5


def test_a_wide_sae_made_by_splitting_each_latent_in_two_gives_back_the_tree():
  rng = np.random.default_rng(2)
  narrow = unit_rows(rng.normal(size=(64, 128)))
  split = np.concatenate([narrow + 0.25 * unit_rows(rng.normal(size=narrow.shape)) for _ in range(2)])
  perm = rng.permutation(128)
  wide = unit_rows(split)[perm]  # wide's latent j came from narrow's latent perm[j] % 64
  tree = children(sae_from(narrow), sae_from(wide), k=4)
  for p, kids in enumerate(tree):
    assert sorted(c for c, _ in kids) == sorted(np.flatnonzero(perm % 64 == p).tolist())
    assert all(cos > 0.9 for _, cos in kids)


def test_saes_of_different_widths_are_refused_naming_both(tmp_path):
  a, b = sae_from(np.eye(8)), sae_from(np.eye(6))
  with pytest.raises(ValueError, match="decoder directions of width 8 .* and 6 .*: the SAEs write spaces of different"):
    decoder_cosines(a, b)
  write_store(tmp_path, shard_rows=(300,), width=8)
  with pytest.raises(ValueError, match=r"an SAE of input width 6 cannot read site res.0 of .* \(width 8\)"):
    activation_correlations(open_store(str(tmp_path)), a, SITE, b, SITE, progress=False)


def test_scope_jax_match_reports_adjacent_layers_in_depth_order(tmp_path, capsys):
  import json

  import scope_jax as sj
  from scope_jax import cli
  from scope_jax.sae.model import SAEInfo

  rng = np.random.default_rng(3)
  w = unit_rows(rng.normal(size=(48, 16)))
  layers = {
    2: permuted(sae_from(w), rng.permutation(48)),  # the same features as layer 1, reordered
    1: sae_from(w),
    3: sae_from(unit_rows(rng.normal(size=(48, 16)))),  # unrelated
  }
  paths = []
  for layer, sae in layers.items():
    paths.append(
      str(sj.save_sae(sae.replace(info=SAEInfo(site=f"res.{layer}")), tmp_path / f"L{layer}", format="saelens"))
    )
  cli.main(["match", *paths, "--out", str(tmp_path / "report")])
  assert "match: 2 adjacent pairs" in capsys.readouterr().out
  entries = json.loads((tmp_path / "report" / "matches.json").read_text())
  assert [(e["from"], e["to"]) for e in entries] == [("res.1", "res.2"), ("res.2", "res.3")]
  assert entries[0]["decoder"]["median"] == pytest.approx(1.0, abs=1e-5) and entries[0]["decoder"]["above_0.7"] == 1.0
  assert entries[1]["decoder"]["median"] < 0.7
  assert (tmp_path / "report" / "matching.png").read_bytes()[:4] == b"\x89PNG"
  assert "| res.1 | res.2 | 1.000 | 100.0% |" in (tmp_path / "report" / "matches.md").read_text()
  narrow = str(sj.save_sae(sae_from(np.eye(8)).replace(info=SAEInfo(site="res.4")), tmp_path / "L4", format="saelens"))
  with pytest.raises(SystemExit, match="scope-jax match: cannot compare decoder directions of width 16"):
    cli.main(["match", paths[0], narrow, "--out", str(tmp_path / "bad")])
