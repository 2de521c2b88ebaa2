"""circuit-tracer on our files, in its own environment (tools/circuit_tracer/setup.sh builds it from
the package registry): its loaders read our CLT and transcoder set and compute what our forward
computes, and tools/circuit_tracer/graphs.sh builds an attribution graph of the embedded Gemma 3
270M from each. circuit-tracer's own edge verifications live in its repository's tests, not its
wheel: they run on our files where a checkout is given ($CIRCUIT_TRACER_SRC; benchmarks/README.md
records such a run)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from scope_jax.models.embedded import cache_dir
from scope_jax.sae.clt import CLTInfo, forward, init_clt
from scope_jax.sae.clt_io import save_circuit_tracer, save_transcoder_set
from scope_jax.sae.model import SAEInfo, init_transcoder

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools" / "circuit_tracer"
LAYERS, D, F = 18, 640, 32


@pytest.fixture(scope="module")
def venv():
  """circuit-tracer's environment, cached by its requirements (skipped, naming why, where pip cannot build it)."""
  key = hashlib.sha256(
    b"".join((TOOLS / f).read_bytes() for f in ("requirements.txt", "constraints.txt", "setup.sh"))
  ).hexdigest()
  path = Path(cache_dir()) / f"venv-circuit-tracer-{key[:12]}"
  if not (path / ".scope_jax_built").exists():
    built = subprocess.run([str(TOOLS / "setup.sh"), str(path)], capture_output=True, text=True, timeout=1200)
    if built.returncode:
      pytest.skip(
        f"circuit-tracer's environment could not be built here (tools/circuit_tracer/setup.sh):\n{built.stderr[-1500:]}"
      )
  return path


def _clt():
  clt = init_clt(jax.random.key(0), LAYERS, D, D, F, 0.0, np.zeros((LAYERS, D)))
  rng = np.random.default_rng(0)
  return jax.tree.map(np.asarray, clt).replace(
    b_enc=rng.normal(size=(LAYERS, F)).astype(np.float32) * 0.5,
    threshold=np.full((LAYERS, F), 0.3, np.float32),  # a few latents per token on the model's MLP inputs
    W_dec=tuple(np.asarray(w) * 0.5 for w in clt.W_dec),
  )


def _transcoders():
  out = []
  for layer in range(LAYERS):
    t = jax.tree.map(np.asarray, init_transcoder(jax.random.key(layer), D, D, F, 0.3, np.zeros(D, np.float32)))
    out.append(
      t.replace(b_enc=np.full(F, 0.2, np.float32), info=SAEInfo(site=f"mlp_in.{layer}", target_site=f"mlp.{layer}"))
    )
  return out


THEIR_FORWARD = """
import sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from attribute import load_dictionary
x = torch.as_tensor(np.load(sys.argv[2]))
for path in sys.argv[3:]:
  d = load_dictionary(Path(path), torch.float32)
  with torch.no_grad():
    if type(d).__name__ == "CrossLayerTranscoder":  # encode every layer, decode with its own sparse decoder
      y = d.decode(d.encode(x))
    else:  # a transcoder set: each layer's transcoder on its own input
      y = torch.stack([t(x[i]) for i, t in enumerate(d)])
  np.save(path + ".npy", y.numpy())
"""


def test_circuit_tracers_loaders_compute_what_our_forward_computes(venv, tmp_path):
  clt = _clt()
  x = np.random.default_rng(1).normal(size=(LAYERS, 5, D)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  save_circuit_tracer(clt, CLTInfo("gemma3-270m", 0, LAYERS), tmp_path / "clt")
  transcoders = _transcoders()
  save_transcoder_set(transcoders, "gemma3-270m", tmp_path / "set")
  want = {
    "clt": np.asarray(forward(clt, x)),
    "set": np.stack([np.asarray(t.decode(t.encode(x[i]))) for i, t in enumerate(transcoders)]),
  }
  paths = [str(tmp_path / name) for name in ("clt", "set")]
  run = subprocess.run(
    [str(venv / "bin/python"), "-c", THEIR_FORWARD, str(TOOLS), str(tmp_path / "x.npy"), *paths],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  for name, path in zip(("clt", "set"), paths):
    np.testing.assert_allclose(np.load(path + ".npy"), want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("kind", ["clt", "set"])
def test_graphs_sh_builds_an_attribution_graph_from_our_files(venv, tmp_path, kind):
  if kind == "clt":
    dictionary = save_circuit_tracer(_clt(), CLTInfo("gemma3-270m", 0, LAYERS), tmp_path / "clt")
  else:
    dictionary = save_transcoder_set(_transcoders(), "gemma3-270m", tmp_path / "set")
  env = os.environ | {"CIRCUIT_TRACER_VENV": str(venv), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
  extra = (
    ["--verify", os.environ["CIRCUIT_TRACER_SRC"], "--verify_samples", "5"]
    if "CIRCUIT_TRACER_SRC" in os.environ
    else []
  )
  run = subprocess.run(
    [str(TOOLS / "graphs.sh"), str(dictionary), str(tmp_path / "graphs"), "The capital of France is", *extra],
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  (record,) = [json.loads(line) for line in (tmp_path / "graphs" / "graphs.jsonl").read_text().splitlines()]
  assert record["active_features"] > 0 and record["nodes"] > record["active_features"]
  assert " Paris" in record["top_logits"], record  # the model itself, through circuit-tracer's nnsight backend
  assert 0 < record["replacement_score"] <= 1 and 0 < record["completeness_score"] <= 1
  assert Path(record["graph"]).stat().st_size > 0
  if extra:
    assert record["verified"]
