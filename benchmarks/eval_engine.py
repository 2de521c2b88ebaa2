"""Evaluation speed: six SAEs at res.6 of the embedded Gemma 3 270M, on held-out text of the local
run, beside

- the work's lower bound, timed with plain forwards in the same run: per batch one forward up to
  the site plus one forward from the site to the loss per SAE and per reference (clean, zero-
  and mean-ablated): 1 + 6 + 3 forwards, the same compiled programs the engine uses;
- the previous engine (one full spliced forward per SAE and per reference, each SAE's splice
  compiling its own copy of the model), rebuilt here from `lm.token_losses(replace=...)`.

Compilation is timed separately (the first call of each against the second). The engine's SAEs
are random (folded) ones: speed does not depend on what they learned. The last line printed is
one JSON object.

Run: PYTHONPATH=. python -m benchmarks.eval_engine        (BATCHES=2 REPEATS=1 by default: ~5 minutes)
"""

import json
import os
import time

import jax
import numpy as np

import scope_jax as sj
from configs.local import get_config
from scope_jax.eval.evaluate import eval_batches, evaluate_saes
from scope_jax.parallel.mesh import use_xnnpack_on_cpu
from scope_jax.sae import fold, init_sae

SITE, BATCHES, REPEATS = "res.6", int(os.environ.get("BATCHES", 2)), int(os.environ.get("REPEATS", 1))


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def lower_bound(lm, batches, forwards_from_site: int, site: str = SITE) -> float:
  """One forward to the site and `forwards_from_site` forwards from it, per batch."""

  def run():
    for b in batches:
      resid, act, _ = lm.to_site(b.tokens, site)
      for _ in range(forwards_from_site):
        lm.token_losses_from_site(b.tokens, site, resid, act).block_until_ready()

  return timed(run)


def previous_engine(lm, splices, saes, batches) -> float:
  """Full forwards with the splice inside, one per SAE and per reference (clean, zero); each
  splice function is a static argument, so each compiles its own model on first use."""

  def run():
    for b in batches:
      acts = lm.activations(b.tokens, [SITE])[SITE]
      for fn in [None, *splices]:
        np.asarray(lm.token_losses(b.tokens, replace={SITE: fn} if fn else None))
      for sae, _ in saes.values():
        np.asarray(sae(acts))

  return timed(run)


def main():
  use_xnnpack_on_cpu()
  lm = sj.load_model("gemma3-270m")
  c = get_config()
  c.eval.sequences = BATCHES * c.eval.batch_size
  batches = eval_batches(c, lm.tokenizer)
  d = lm.config.d_model
  saes = {
    f"w{w}-{i}": (fold(init_sae(jax.random.key(i), d, w), 30.0 + i), SITE) for w in (1_024, 2_048) for i in range(3)
  }
  tokens = sum(b.tokens.size for b in batches)

  first = timed(lambda: evaluate_saes(lm, saes, batches, progress=False))
  engine = min(timed(lambda: evaluate_saes(lm, saes, batches, progress=False)) for _ in range(REPEATS))
  bound = min(lower_bound(lm, batches, len(saes) + 3) for _ in range(REPEATS))
  splices = [lambda a: a.at[:, 1:].set(0)] + [
    (lambda sae: lambda a: a.at[:, 1:].set(sae(a)[:, 1:]))(sae)  # noqa: B023 (bound)
    for sae, _ in saes.values()
  ]
  previous_first = previous_engine(lm, splices, saes, batches)
  previous = previous_engine(lm, splices, saes, batches)
  out = {
    "device": jax.devices()[0].device_kind,
    "tokens": tokens,
    "saes": len(saes),
    "site": SITE,
    "engine_s": engine,
    "engine_compile_s": first - engine,
    "lower_bound_s": bound,
    "engine_over_bound": engine / bound,
    "previous_s": previous,
    "previous_compile_s": previous_first - previous,
    "previous_over_engine": previous / engine,
  }
  print(f"eval of {len(saes)} SAEs at {SITE} on {tokens:,} tokens ({len(batches)} batches):")
  print(
    f"  engine          {engine:7.2f} s  ({out['engine_over_bound']:.2f}x the lower bound of {bound:.2f} s: "
    f"1 forward to the site + {len(saes) + 3} from it per batch); compilation {out['engine_compile_s']:.1f} s"
  )
  print(
    f"  previous engine {previous:7.2f} s  ({out['previous_over_engine']:.2f}x the engine); "
    f"compilation {out['previous_compile_s']:.1f} s"
  )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
