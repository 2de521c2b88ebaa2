"""SAE quality against SAELens: its JumpReLU trainer (`SAETrainer` + `JumpReLUTrainingSAE`) on the
same stored batches as a finished run of ours, with the same budget, evaluated by our engine on the
same held-out text, beside our SAEs.

What SAELens gets, for a fair race:
- the same rows in the same order: batch s is our loader's batch s (raw, unnormalized), for as many
  steps of as many rows as our run trained;
- every recipe feature it has: its own activation normalization ("expected_average_only_in"),
  the pre-encoder bias, the "step" (Gemma Scope) L0 loss with its linear warm-up, the learning-rate
  warm-up and linear decay to zero, the dead-latent pre-activation loss (`pre_act_loss_coefficient`,
  which ours copies) on latents silent for as many steps, Adam β = (0, 0.999), our learning rate;
- λ, the bandwidth ε, θ₀ and the dead-latent coefficient translated to its units: its inputs are
  ours times r = C_ours / C_sl (C_sl = sqrt(E||x||² / d)), so ε, θ₀ and the pre-activation loss's
  coefficient scale by r and λ by r² (the same penalties relative to the reconstruction term).
  What it lacks is ours alone: b_dec starting at the mean (it starts at zero) and C measured
  without the offset. It clips the gradient norm at 1 (built in; its norms run 3–1,000, so every
  step is clipped), as the local config now does too (`recipe.clip_grad_norm`). Its Adam β2 is
  the local config's (0.99).

Our Δ loss at matched L0 is read off our Pareto curve of the same width (linear in log L0 between
our points); SAELens points outside our L0 range are reported, not compared.

TopK and BatchTopK runs (`configs/local.py:kind=topk` or `batchtopk`) race SAELens's
`TopKTrainingSAE` / `BatchTopKTrainingSAE` at the same k: their defaults (AuxK coefficient 1, decoder
rows at norm 0.1 rescaling the activations, Adam β = (0.9, 0.999)) plus our batch, steps, learning
rate and schedule, their activation normalization, and dead latents (for AuxK) over our window.

Run (after `scope-jax run --config configs/local.py --workdir runs/local`):
    PYTHONPATH=. python -m benchmarks.quality_vs_saelens --workdir runs/local
    PYTHONPATH=. python -m benchmarks.quality_vs_saelens --workdir runs/topk --config_arg kind=topk \
      [--store runs/local/activations] [--widths 1024]
The last line printed is one JSON object; the SAELens SAEs are kept in WORKDIR/saelens_peer/.
"""

import argparse
import json
from pathlib import Path

import jax
import numpy as np
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

import scope_jax as sj
from configs.local import get_config
from scope_jax.activations.extract import load_extraction_model, store_root
from scope_jax.data.loader import StoreLoader
from scope_jax.eval.evaluate import eval_batches, evaluate_saes
from scope_jax.parallel.mesh import make_mesh, use_xnnpack_on_cpu


def batches_from(loader: StoreLoader, steps: int):
  for s in range(steps):
    yield torch.from_numpy(np.asarray(loader.batch(s).x_bd).copy())


def saelens_sae(activation: str, width: int, sparsity: float, ratio: float, d_in: int, r):
  """SAELens's training SAE of `activation` (`sparsity`: λ in our units, or k)."""
  if activation in ("topk", "batchtopk"):
    cls, cfg_cls = (
      (TopKTrainingSAE, TopKTrainingSAEConfig)
      if activation == "topk"
      else (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)
    )
    return cls(cfg_cls(d_in=d_in, d_sae=width, k=int(sparsity), normalize_activations="expected_average_only_in"))
  cfg = JumpReLUTrainingSAEConfig(
    d_in=d_in,
    d_sae=width,
    apply_b_dec_to_input=True,
    normalize_activations="expected_average_only_in",
    jumprelu_bandwidth=r.bandwidth * ratio,
    jumprelu_init_threshold=r.init_threshold * ratio,
    jumprelu_sparsity_loss_mode="step",
    l0_coefficient=sparsity * ratio**2,
    l0_warm_up_steps=r.sparsity_warmup_steps,
    pre_act_loss_coefficient=(r.dead_latent_loss * ratio) or None,
  )
  return JumpReLUTrainingSAE(cfg)


def train_saelens(loader, activation, width, sparsity, ratio, config, out: Path) -> Path:
  """Trains one SAELens SAE into `out` (kept: a re-run reuses it)."""
  ranked = activation in ("topk", "batchtopk")
  path = out / (f"w{width}-k{int(sparsity)}" if ranked else f"w{width}-l{sparsity:g}")
  if (path / "cfg.json").exists():
    return path
  r = config.recipe
  torch.manual_seed(config.seed)
  sae = saelens_sae(activation, width, sparsity, ratio, loader.width, r)
  steps, batch = config.train.steps, config.train.batch_size
  adam = {} if ranked else {"adam_beta1": r.adam_b1, "adam_beta2": r.adam_b2}  # TopK: SAELens's own
  trainer_cfg = SAETrainerConfig(
    total_training_samples=steps * batch,
    train_batch_size_samples=batch,
    lr=r.lr,
    lr_end=r.lr,
    lr_warm_up_steps=r.lr_warmup_steps,
    lr_decay_steps=r.lr_decay_steps,
    dead_feature_window=r.dead_window_steps,
    n_batches_for_norm_estimate=20,
    **adam,
  )
  norm_estimate = batches_from(loader, 20)
  data = (x for stream in (norm_estimate, batches_from(loader, steps)) for x in stream)
  trained = SAETrainer(trainer_cfg, sae, data).fit()
  trained.save_inference_model(path)
  return path


def our_delta_at(l0: float, curve: list[tuple[float, float]]) -> float | None:
  """Our Δ loss at `l0`, linear in log L0 between our points of the same width; None outside."""
  curve = sorted(curve)
  xs, ys = np.log([p[0] for p in curve]), [p[1] for p in curve]
  return float(np.interp(np.log(l0), xs, ys)) if xs[0] <= np.log(l0) <= xs[-1] else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="runs/local")
  parser.add_argument("--config_arg", default="", help="the run's configs/local.py argument, if it had one")
  parser.add_argument("--store", default="", help="the run's activation store, if not WORKDIR/activations")
  parser.add_argument("--widths", default="", help="compare only these widths (comma-separated); default: the run's")
  args = parser.parse_args()
  use_xnnpack_on_cpu()
  workdir = Path(args.workdir)
  config = get_config(args.config_arg)
  config.extract.store = args.store or config.extract.store
  ours = json.loads((workdir / "report" / "metrics.json").read_text())["float32"]
  mesh = make_mesh(devices=jax.devices()[:1])
  loader = StoreLoader(
    store_root(config, workdir),
    config.site,
    config.train.batch_size,
    mesh,
    config.seed,
    normalize=None,
    window_chunks=config.data.window_chunks,
  )
  stats = loader.store.stats(config.site)
  c_ours = float(np.sqrt(stats["mean_sq_norm"] - stats["mean"] @ stats["mean"]))
  c_saelens = float(np.sqrt(stats["mean_sq_norm"] / loader.width))
  ratio = c_ours / c_saelens
  out = workdir / "saelens_peer"
  paths = {}
  widths = [int(w) for w in args.widths.split(",")] if args.widths else config.sweep.widths
  activation = config.sweep.activation
  ranked = activation in ("topk", "batchtopk")
  for width in widths:
    for v in config.sweep.k if ranked else config.sweep.l1_coefficients:
      name = f"saelens-w{width}-k{v}" if ranked else f"saelens-w{width}-l{v:g}"
      paths[name] = (train_saelens(loader, activation, width, v, ratio, config, out), width, v)
  loader.close()

  lm = load_extraction_model(config)
  saes = {name: (sj.load_sae(path), config.site) for name, (path, _, _) in paths.items()}
  theirs = evaluate_saes(lm, saes, eval_batches(config, lm.tokenizer))
  rows = []
  for name, (_, width, sparsity) in paths.items():
    curve = [(r["l0"], r["delta_loss"]) for r in ours.values() if r["width"] == width]
    t = theirs[name]
    mine = our_delta_at(t["l0"], curve)
    rows.append(
      {
        "sae": name,
        "width": width,
        "k" if ranked else "lambda_ours_units": sparsity,
        "l0": t["l0"],
        "delta_loss": t["delta_loss"],
        "delta_loss_se": t["delta_loss_se"],
        "fvu": t["fvu"],
        "dead_fraction": t["dead_fraction"],
        "ours_at_same_l0": mine,
      }
    )
  print(f"units: SAELens inputs = ours × {ratio:.2f}; λ × {ratio**2:.1f}, ε and θ₀ × {ratio:.2f}")
  print(f"{'SAE':24} {'L0':>7} {'Δ loss':>14} {'FVU':>6} {'dead':>6} {'ours at same L0':>16}")
  for name, r in sorted(((n, r) for n, r in ours.items()), key=lambda kv: (kv[1]["width"], kv[1]["l0"])):
    print(
      f"{'ours ' + name:24} {r['l0']:7.1f} {r['delta_loss']:7.3f} ± {r['delta_loss_se']:.3f} {r['fvu']:6.3f} "
      f"{r['dead_fraction']:6.1%}"
    )
  for r in rows:
    mine = "outside our L0 range" if r["ours_at_same_l0"] is None else f"{r['ours_at_same_l0']:.3f}"
    print(
      f"{r['sae']:24} {r['l0']:7.1f} {r['delta_loss']:7.3f} ± {r['delta_loss_se']:.3f} {r['fvu']:6.3f} "
      f"{r['dead_fraction']:6.1%} {mine:>16}"
    )
  print(
    json.dumps(
      {
        "activation": activation,
        "ratio": ratio,
        "steps": config.train.steps,
        "batch": config.train.batch_size,
        "saelens": rows,
        "ours": {
          n: {
            k: r.get(k)
            for k in ("width", "l1_coefficient", "k", "l0", "delta_loss", "delta_loss_se", "fvu", "dead_fraction")
          }
          for n, r in ours.items()
        },
      }
    )
  )


if __name__ == "__main__":
  main()
