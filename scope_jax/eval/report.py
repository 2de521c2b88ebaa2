"""Plots (matplotlib, PNG), `metrics.json`, `report.md` and a self-contained `report.html`.

WORKDIR/report/metrics.json          every SAE's numbers (float32 and bfloat16)
WORKDIR/report/pareto_delta_loss.png delta LM loss against L0, one curve per width
WORKDIR/report/pareto_fvu.png        FVU against L0, one curve per width
WORKDIR/report/density_NAME.png      log10 firing-density histogram of each SAE
WORKDIR/report/training.png          training curves of every SAE (from WORKDIR/metrics.jsonl)
WORKDIR/report/domains.png           Δ LM loss of every SAE on each `eval.domains` text
WORKDIR/report/report.md, report.html
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scope_jax.eval.statistics import log10_density_histogram  # noqa: E402


def _with_se(key: str, label: str, fmt: str) -> list[tuple[str, str, str]]:
  """A metric's column and its standard error's (`{key}_se`), printed alike."""
  return [(key, label, fmt), (f"{key}_se", "± SE", fmt)]


_FRACTIONS = {  # printed as percentages
  "loss_recovered_mean": "recovered (mean abl.)",
  "loss_recovered": "recovered (zero abl.)",
  "dead_fraction": "silent on eval text",
  "dead_export": "dead (export rows)",
  "dense_fraction": "dense",
}
COLUMNS = [  # (metric, header, format) of the report's table
  ("width", "width", "{:d}"),
  ("l1_coefficient", "λ", "{:g}"),
  ("k", "k", "{:d}"),
  ("l0", "L0", "{:.1f}"),
  *_with_se("delta_loss", "Δ loss", "{:.4f}"),
  ("delta_loss_mean_ablation", "Δ loss, mean-ablated", "{:.4f}"),
  ("delta_loss_zero_ablation", "Δ loss, zero-ablated", "{:.4f}"),
  *_with_se("fvu", "FVU", "{:.3f}"),
  ("mse", "MSE", "{:.4g}"),
  *((key, label, "{:.1%}") for key, label in _FRACTIONS.items()),
]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def pareto_plot(results: dict, y: str, ylabel: str, path: Path) -> None:
  """`y` against L0, one curve per width (and per width of KL-finetuned SAEs, dashed), with error
  bars of one standard error (`{y}_se`)."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  curve_of = lambda r: (r["width"], bool(r.get("finetuned")))  # KL-finetuned SAEs get their own curves
  for width, finetuned in sorted({curve_of(r) for r in results.values()}):
    l0, value, se = zip(
      *sorted((r["l0"], r[y], r[f"{y}_se"]) for r in results.values() if curve_of(r) == (width, finetuned))
    )
    style = (
      dict(linestyle="--", marker="s", label=f"width {width}, KL-finetuned")
      if finetuned
      else dict(marker="o", label=f"width {width}")
    )
    ax.errorbar(l0, value, yerr=se, capsize=3, **style)
  ax.set_xscale("log")
  ax.set_xlabel("L0 (active latents per token)")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def density_plot(name: str, density_m: np.ndarray, path: Path) -> None:
  counts, edges, dead = log10_density_histogram(density_m)
  fig, ax = plt.subplots(figsize=(5, 3), dpi=110)
  ax.stairs(counts, edges, fill=True)
  ax.set_xlabel("log10 firing density")
  ax.set_ylabel("latents")
  ax.set_title(f"{name} ({dead} dead)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


CURVES = {  # metric: (axis label, y scale)
  "loss": ("loss", "log"),
  "l0": ("L0", "log"),
  "fvu": ("FVU (training batch)", "log"),
  "dead_fraction": ("dead fraction", "linear"),
  "window_fraction": ("pre-activations in θ's kernel window", "log"),
  "threshold_moved": ("mean |θ − θ₀| / θ₀", "log"),
}


def training_curves(metrics_jsonl: Path, path: Path) -> bool:
  """One panel per training metric against step, a line per SAE; False when there is no log."""
  if not metrics_jsonl.exists():
    return False
  series: dict[str, list[dict]] = {}
  for line in metrics_jsonl.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      series.setdefault(record["sae"], []).append(record)
  if not series:
    return False
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), dpi=100)
  for ax, (key, (label, scale)) in zip(axes.flat, CURVES.items()):
    for name, records in sorted(series.items()):
      points = [(r["step"], r[key]) for r in records if key in r and (scale == "linear" or r[key] > 0)]
      if points:
        ax.plot(*zip(*points), label=name, linewidth=1.2)
    ax.set_yscale(scale)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


@dataclasses.dataclass
class Section:
  """A table (and plots) after the main one: per-domain Δ loss, quantized weights; `data` goes to
  metrics.json under `key`."""

  key: str
  title: str
  header: list[str]
  rows: list[list[str]]
  data: dict
  plots: dict[str, object] = dataclasses.field(default_factory=dict)  # file name -> fn(path) drawing it


def domain_section(per_domain: dict[str, dict], sources: dict[str, str]) -> Section:
  """Δ LM loss (± SE), FVU and L0 of every SAE on each domain's text."""
  domains = list(per_domain)
  names = list(next(iter(per_domain.values())))
  rows = [
    [name]
    + [f"{per_domain[d][name]['delta_loss']:.4f} ± {per_domain[d][name]['delta_loss_se']:.4f}" for d in domains]
    + [f"{per_domain[d][name]['fvu']:.3f}" for d in domains]
    for name in names
  ]
  keep = ("delta_loss", "delta_loss_se", "fvu", "fvu_se", "l0", "ce_clean", "tokens")
  data = {
    d: {"source": sources[d], "saes": {n: {k: per_domain[d][n][k] for k in keep} for n in names}} for d in domains
  }

  def plot(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) * len(domains)), 4), dpi=110)
    step = 0.8 / len(domains)
    for j, d in enumerate(domains):
      values = [per_domain[d][n]["delta_loss"] for n in names]
      errors = [per_domain[d][n]["delta_loss_se"] for n in names]
      ax.bar(np.arange(len(names)) + j * step, values, step, yerr=errors, capsize=2, label=f"{d} ({sources[d]})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - step / 2, names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Δ LM loss (nats, ± 1 SE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

  header = ["SAE"] + [f"Δ loss {d}" for d in domains] + [f"FVU {d}" for d in domains]
  return Section("domains", "Δ LM loss per domain", header, rows, data, {"domains.png": plot})


def quantization_section(results: dict[str, dict], names: list[str], formats: tuple[str, ...]) -> Section:
  """Each SAE with its weights in each format (model float32), against its float32 weights on the
  same sequences: Δ loss, FVU and L0, and their differences."""
  rows, data = [], {}
  for name in names:
    base = results[name]
    rows.append([name, "float32", f"{base['delta_loss']:.4f}", "—", f"{base['fvu']:.4f}", "—", f"{base['l0']:.1f}"])
    data[name] = {"float32": {k: base[k] for k in ("delta_loss", "fvu", "l0")}}
    for fmt in formats:
      r = results[f"{name}@{fmt}"]
      d_loss, d_fvu = r["delta_loss"] - base["delta_loss"], r["fvu"] - base["fvu"]
      rows.append(
        [name, fmt, f"{r['delta_loss']:.4f}", f"{d_loss:+.4f}", f"{r['fvu']:.4f}", f"{d_fvu:+.4f}", f"{r['l0']:.1f}"]
      )
      data[name][fmt] = {"delta_loss": r["delta_loss"], "fvu": r["fvu"], "l0": r["l0"], "delta_loss_diff": d_loss}
  header = ["SAE", "weights", "Δ loss", "− float32", "FVU", "− float32", "L0"]
  return Section("quantization", "Quantized SAE weights (model in float32)", header, rows, data)


def finetune_section(results: dict[str, dict], suffix: str) -> Section:
  """Each KL-finetuned SAE (named NAME + `suffix`) beside its original: L0, Δ LM loss ± SE, FVU, and
  the change in Δ loss."""
  rows, data = [], {}
  for name in sorted(n for n in results if n.endswith(suffix) and n[: -len(suffix)] in results):
    before, after = results[name[: -len(suffix)]], results[name]
    change = after["delta_loss"] / before["delta_loss"] - 1 if before["delta_loss"] else float("nan")
    rows.append(
      [name[: -len(suffix)]]
      + [f"{before['l0']:.1f} → {after['l0']:.1f}"]
      + [f"{r['delta_loss']:.4f} ± {r['delta_loss_se']:.4f}" for r in (before, after)]
      + [f"{change:+.1%}", f"{before['fvu']:.4f} → {after['fvu']:.4f}"]
    )
    keep = ("l0", "delta_loss", "delta_loss_se", "fvu", "fvu_se")
    data[name] = {
      "before": {k: before[k] for k in keep},
      "after": {k: after[k] for k in keep},
      "delta_loss_change": change,
    }
  header = ["SAE", "L0 before → after", "Δ loss before", "Δ loss after", "change", "FVU before → after"]
  return Section("finetune", "KL finetuning: each SAE before and after", header, rows, data)


def _table(results: dict) -> list[list[str]]:
  rows = []
  for name, r in sorted(results.items(), key=lambda kv: (kv[1]["width"], kv[1]["l0"])):
    rows.append([name] + [fmt.format(r[key]) if r.get(key) is not None else "—" for key, _, fmt in COLUMNS])
  return rows


def write_report(
  results: dict,
  results_bf16: dict | None,
  out: Path,
  title: str,
  warnings: list[str] = (),
  metrics_jsonl: Path | None = None,
  sections: list[Section] = (),
) -> dict[str, Path]:
  """Writes everything; `results[name]` holds the metrics plus "width" and "l1_coefficient";
  `warnings` (training health, an eval set too small, ...) head the report; `metrics_jsonl`, the
  training log, gives the training curves; `sections` follow the main table."""
  out.mkdir(parents=True, exist_ok=True)
  for section in sections:
    for file, draw in section.plots.items():
      draw(out / file)
  images = {
    "pareto_delta_loss.png": ("delta_loss", "Δ LM loss (spliced − clean)"),
    "pareto_fvu.png": ("fvu", "fraction of variance unexplained"),
  }
  for file, (key, label) in images.items():
    pareto_plot(results, key, label, out / file)
  curves = metrics_jsonl is not None and training_curves(metrics_jsonl, out / "training.png")
  densities = {}
  for name, r in results.items():
    densities[name] = out / f"density_{_safe(name)}.png"
    density_plot(name, r["density"], densities[name])
  strip = lambda rs: {n: {k: v for k, v in r.items() if k != "density"} for n, r in rs.items()}
  (out / "metrics.json").write_text(
    json.dumps(
      {
        "float32": strip(results),
        "bfloat16": strip(results_bf16 or {}),
        "warnings": list(warnings),
        **{section.key: section.data for section in sections},
      },
      indent=2,
      default=float,
    )
    + "\n"
  )
  header = ["SAE"] + [label for _, label, _ in COLUMNS]
  rows = _table(results)
  md = [f"# {title}", ""] + [f"> **warning:** {w}" for w in warnings] + [""] * bool(warnings)
  md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  md += ["| " + " | ".join(row) + " |" for row in rows]
  if results_bf16:
    md += ["", "## bfloat16 (model and SAEs)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in _table(results_bf16)]
  for section in sections:
    md += ["", f"## {section.title}", "", "| " + " | ".join(section.header) + " |", "|" + "---|" * len(section.header)]
    md += ["| " + " | ".join(row) + " |" for row in section.rows]
    md += [""] + [f"![{section.title}]({file})" for file in section.plots]
  md += ["", "![delta loss vs L0](pareto_delta_loss.png)", "![FVU vs L0](pareto_fvu.png)", ""]
  md += ["## Training", "", "![training curves](training.png)", ""] * curves
  md += [f"![{n}]({p.name})" for n, p in densities.items()]
  (out / "report.md").write_text("\n".join(md) + "\n")

  def img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'

  def table(rows, header=header) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"

  parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p><b>warning:</b> {html.escape(w)}</p>" for w in warnings]
  parts += [table(rows)]
  if results_bf16:
    parts += ["<h2>bfloat16 (model and SAEs)</h2>", table(_table(results_bf16))]
  for section in sections:
    parts += [f"<h2>{html.escape(section.title)}</h2>", table(section.rows, section.header)]
    parts += [img(out / file) for file in section.plots]
  parts += [img(out / f) for f in images] + ["<h2>Training</h2>", img(out / "training.png")] * curves
  parts += [img(p) for p in densities.values()]
  style = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
  )
  (out / "report.html").write_text(
    f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
  )
  return {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
