"""Attribution graphs from scope_jax's files with circuit-tracer (run in its own environment,
tools/circuit_tracer/setup.sh; graphs.sh runs this for you):

    .venv-circuit-tracer/bin/python tools/circuit_tracer/attribute.py --model HF_DIR \\
        --dictionary EXPORT_DIR --out OUT "The capital of France is" ...

`--dictionary`: a CLT in circuit-tracer's layout (`scope-jax export` of kind = clt writes
`export/circuit-tracer/NAME`) or a transcoder set (`scope-jax transcoder-set`). Each prompt's graph
is saved as `OUT/graph_{i}.pt` with a line of `OUT/graphs.jsonl` (nodes, features, the top logits
and circuit-tracer's replacement and completeness scores). `--verify CIRCUIT_TRACER_SRC` also runs
circuit-tracer's own `verify_token_and_error_edges` and `verify_feature_edges` (from the tests of a
checkout of its repository: they are not in its wheel) on every graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml


def load_dictionary(path: Path, dtype: torch.dtype):
  """circuit-tracer's own loaders on a local directory (absolute paths: it reads nothing else locally)."""
  from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
  from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

  path = path.absolute()
  config = yaml.safe_load((path / "config.yaml").read_text())
  hooks = dict(feature_input_hook=config["feature_input_hook"], feature_output_hook=config["feature_output_hook"])
  if config["model_kind"] == "cross_layer_transcoder":
    return load_clt(
      str(path), scan=config["scan"], dtype=dtype, device=torch.device("cpu"), lazy_decoder=False, **hooks
    )
  paths = {i: str(Path(p).absolute()) for i, p in enumerate(config["transcoders"])}
  return load_transcoder_set(
    paths, scan=config["scan"], dtype=dtype, device=torch.device("cpu"), lazy_encoder=False, lazy_decoder=False, **hooks
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("prompts", nargs="+")
  parser.add_argument("--model", required=True, help="Hugging Face directory of the model (graphs.sh makes it)")
  parser.add_argument("--dictionary", required=True, help="a CLT or transcoder-set directory (circuit-tracer layout)")
  parser.add_argument("--out", required=True)
  parser.add_argument("--max_feature_nodes", type=int, default=None, help="default: every active feature")
  parser.add_argument("--verify", default="", help="a circuit-tracer source checkout: run its edge verifications")
  parser.add_argument("--verify_samples", type=int, default=20)
  args = parser.parse_args()

  from circuit_tracer import ReplacementModel, attribute
  from circuit_tracer.graph import compute_graph_scores

  torch.manual_seed(0)
  dtype = torch.float32
  dictionary = load_dictionary(Path(args.dictionary), dtype)
  model = ReplacementModel.from_pretrained_and_transcoders(
    str(Path(args.model).absolute()), dictionary, backend="nnsight", device=torch.device("cpu"), dtype=dtype
  )
  verify = _verifications(args.verify) if args.verify else None
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with (out / "graphs.jsonl").open("w") as log:
    for i, prompt in enumerate(args.prompts):
      start = time.perf_counter()
      graph = attribute(prompt, model, max_feature_nodes=args.max_feature_nodes, batch_size=64, verbose=False)
      seconds = time.perf_counter() - start
      graph.to_pt(str(out / f"graph_{i}.pt"))
      replacement, completeness = compute_graph_scores(graph)
      top = [model.tokenizer.decode([int(t)]) for t in graph.logit_token_ids[:5]]
      record = {
        "prompt": prompt,
        "graph": str(out / f"graph_{i}.pt"),
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": int(graph.selected_features.shape[0]),
        "nodes": int(graph.adjacency_matrix.shape[0]),
        "top_logits": top,
        "replacement_score": float(replacement),
        "completeness_score": float(completeness),
        "seconds": round(seconds, 1),
      }
      if verify is not None:  # as circuit-tracer's tests call them (its Gemma 3 tests: softcap off)
        token_and_error, feature_edges = verify
        with model.zero_softcap():
          token_and_error(model, graph)
          feature_edges(model, graph, n_samples=args.verify_samples)
        record["verified"] = ["verify_token_and_error_edges", f"verify_feature_edges ({args.verify_samples} features)"]
      log.write(json.dumps(record) + "\n")
      log.flush()
      print(json.dumps(record), flush=True)


def _verifications(source: str):
  """circuit-tracer's verifications for Gemma 3 on the nnsight backend, from its repository's tests."""
  sys.path.insert(0, str(Path(source).absolute()))
  from tests.test_attributions_gemma3_nnsight import verify_feature_edges, verify_token_and_error_edges

  return verify_token_and_error_edges, verify_feature_edges


if __name__ == "__main__":
  main()
