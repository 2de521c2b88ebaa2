"""The browser's statistics and windows against brute force over small stores written with the
store's own writer (rows shuffled within buckets, as extraction writes them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scope_jax.activations.store import open_store
from scope_jax.browse.contexts import TokenText, windows
from scope_jax.browse.features import N_BINS, bin_of, keep_largest, scan
from scope_jax.sae import SAE
from scope_jax.text.tokenizer import Tokenizer
from tests.data.stores import SITE, write_store


def random_sae(width=24, d=8, seed=0) -> SAE:
  k = jax.random.split(jax.random.key(seed), 3)
  w_enc = jax.random.normal(k[0], (d, width)).at[:2].set(0.0)  # columns 0, 1 hold ids: not read
  return SAE(
    W_enc=w_enc,
    b_enc=0.3 * jax.random.normal(k[1], (width,)),
    W_dec=jax.random.normal(k[2], (width, d)),
    b_dec=jnp.zeros(d),
    threshold=jnp.full((width,), 0.5),
  )


@pytest.mark.parametrize("k", [1, 2, 16])
def test_keep_largest_equals_a_per_group_sort_with_ties_and_negative_keys(k):
  rng = np.random.default_rng(k)
  n = 20_000
  group = rng.integers(0, 300, n) * 7  # sparse group numbers
  key = np.round(rng.normal(size=n), 2)  # many equal keys, both signs
  key[::97] = 1e300
  tie = rng.permutation(n)
  g, kk, idx = keep_largest(group, key, np.arange(n), k=k, tie=tie)
  expected = []
  for grp in sorted(set(group.tolist())):
    members = sorted(np.flatnonzero(group == grp), key=lambda i: (-key[i], tie[i]))
    expected += members[:k]
  assert idx.tolist() == expected
  assert g.tolist() == group[expected].tolist() and kk.tolist() == key[expected].tolist()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp("store")
  write_store(root, shard_rows=(1_000, 700), doc_rows=50)
  return open_store(str(root))


def test_keep_largest_keeps_each_group_s_k_largest_in_order():
  group = np.array([2, 1, 2, 1, 2, 3, 2])
  key = np.array([0.5, 3.0, 0.9, 1.0, 0.7, 2.0, 0.9])
  g, k, idx = keep_largest(group, key, np.arange(7), k=2)
  assert g.tolist() == [1, 1, 2, 2, 3] and k.tolist() == [3.0, 1.0, 0.9, 0.9, 2.0]
  assert idx.tolist() == [1, 3, 2, 6, 5]  # equal keys: the earlier entry first


@pytest.mark.parametrize("chunk_rows", [128, 700, 4096])
def test_the_top_contexts_density_and_histogram_equal_a_brute_force_pass(store, chunk_rows):
  saes = {"a": random_sae(24, seed=1), "b": random_sae(40, seed=2)}
  stats = scan(store, SITE, saes, top_k=5, samples=3, chunk_rows=chunk_rows, progress=False)
  x = store.read(SITE, 0, store.rows)
  for name, sae in saes.items():
    acts = np.asarray(sae.encode(jnp.asarray(x)))
    s = stats[name]
    assert s.rows == store.rows
    np.testing.assert_array_equal(s.fires_m, (acts > 0).sum(0))
    for m in range(sae.width):
      rows, values = s.top_of(m)
      order = np.argsort(-acts[:, m], kind="stable")[: min(5, int((acts[:, m] > 0).sum()))]
      np.testing.assert_array_equal(rows, order)
      np.testing.assert_allclose(values, acts[order, m], rtol=1e-6)
      active = acts[:, m][acts[:, m] > 0]
      np.testing.assert_array_equal(s.hist_mb[m], np.bincount(bin_of(active), minlength=N_BINS))
    # samples: up to 3 per (latent, bin), each a real activation of that latent in that bin
    latent, bins = np.divmod(s.samples.group, N_BINS)
    np.testing.assert_allclose(s.samples.value, acts[s.samples.row, latent], rtol=1e-6)
    np.testing.assert_array_equal(bin_of(s.samples.value), bins)
    per_group = np.bincount(s.samples.group, minlength=sae.width * N_BINS).reshape(sae.width, N_BINS)
    np.testing.assert_array_equal(per_group, np.minimum(s.hist_mb, 3))


def test_co_activation_of_given_pairs_equals_brute_force(store):
  saes = {"narrow": random_sae(24, seed=1), "wide": random_sae(40, seed=2)}
  pairs = np.array([[0, 0], [0, 5], [3, 39], [23, 7]])
  stats = scan(store, SITE, saes, pairs={("narrow", "wide"): pairs}, chunk_rows=300, progress=False)
  x = jnp.asarray(store.read(SITE, 0, store.rows))
  a, b = (np.asarray(saes[n].encode(x)) > 0 for n in ("narrow", "wide"))
  expected = [int(np.sum(a[:, p] & b[:, c])) for p, c in pairs]
  assert stats["narrow"].co_fires["wide"].tolist() == expected and max(expected) > 0


def test_the_scan_is_the_same_twice_and_refuses_an_sae_of_another_width(store):
  one = scan(store, SITE, {"a": random_sae()}, samples=2, chunk_rows=300, progress=False)["a"]
  two = scan(store, SITE, {"a": random_sae()}, samples=2, chunk_rows=300, progress=False)["a"]
  np.testing.assert_array_equal(one.samples.row, two.samples.row)
  with pytest.raises(ValueError, match=r"SAE wide: input width 9, but site res.0 of .* has width 8"):
    scan(store, SITE, {"wide": random_sae(d=9)}, progress=False)


def test_windows_are_the_neighbouring_tokens_of_the_same_sequence_and_document(store):
  """Each row's global id is its column 0; its trace says token id % 97, document id // 50, sequence
  id // 63 at column id % 63. A window must hold the ids next to it that share both."""
  x = store.read(SITE, 0, store.rows)
  ids = x[:, 0].astype(np.int64)
  rows = np.array([0, 5, 63, 300, 999, 1_000, 1_699, 777])
  sae = random_sae()
  w = windows(store, SITE, sae, rows, np.arange(len(rows)) % sae.width, before=6, after=3)
  assert w.center == 6
  acts = np.asarray(sae.encode(jnp.asarray(x)))
  row_of_id = np.argsort(ids)
  for i, r in enumerate(rows):
    center = ids[r]
    expected = []
    for o in range(-6, 4):
      other = center + o
      ok = 0 <= other < store.rows and other // 50 == center // 50 and other // 63 == center // 63
      expected.append(other % 97 if ok else -1)
    # a window is the contiguous run around its row; here documents and sequences are runs of ids
    np.testing.assert_array_equal(w.tokens_nw[i], expected)
    shown = np.flatnonzero(w.tokens_nw[i] >= 0)
    latent = i % sae.width
    np.testing.assert_allclose(w.values_nw[i, shown], acts[row_of_id[center + shown - 6], latent], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", ["Hello world, this is text.", "naïve café — 東京 and 🙂", "  two spaces\tand a tab"])
def test_each_tokens_string_is_what_it_adds_to_the_decoded_prefix_in_every_window(tiny_model, text):
  """The browser shows each token of a window as a string; their concatenation is the window's
  decoding. The fast path (the pieces, less the space a dummy-prefix tokenizer drops) must equal
  the per-prefix rule on every window, byte-fallback characters included."""
  tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.model"))  # dummy prefix, byte fallback
  token_text = TokenText(tokenizer)
  ids = tokenizer.encode(text, add_bos=False)
  for start in range(len(ids)):
    for end in range(start + 1, len(ids) + 1):
      window = ids[start:end]
      shown = token_text.strings(window)
      assert shown == token_text.by_prefix(window), (start, end)
      assert "".join(shown) == tokenizer.decode(window)
