"""Config sweeps: a grid of sites × widths × λ turned into extraction and trainer jobs.

    scope-jax sweep --config configs/gemma2.py:size=2b --workdir DIR --dry-run   # the job table
    scope-jax sweep --config configs/gemma2.py:size=2b --workdir DIR             # run (or resume) them
    scope-jax sweep ... --jobs 'train/res.12-*'                                  # only some (fnmatch)
    scope-jax sweep ... --dry_run --target v4-32      # what each job needs there (train/plan.py)

A config declares the grid in `config.grid` (scope_jax/config.py): layers × kinds give the
sites; every site trains `grid.widths` (or its own widths from `grid.site_widths`) at every λ of
`sweep.l1_coefficients`; `grid.tokens_by_width` gives each width its token budget. Layers ×
`grid.transcoders` give the transcoders (mlp_in.L -> mlp.L, `grid.transcoder_widths`), trained
from the same stores: a transcoder's two sites share its largest budget and one store.

Jobs:
- one extraction per (model, token budget, site set): the sites of one layer (`grid.extract_by`)
  that need the same budget are written by one forward into one store, under `extract.store`
  (a local path or gs://bucket/prefix; default WORKDIR/stores);
- one trainer job per (site, token budget), and per (transcoder kind, layer, token budget): every
  SAE that shares them is stacked into one sweep step (scope_jax/train/stacked.py), then exported
  and evaluated.

Every job is idempotent: a finished store (manifest written) or a trainer job whose evaluation
marker matches its config and latest checkpoint is skipped, an unfinished one resumes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path

import ml_collections

from scope_jax.activations.store import KV, MANIFEST
from scope_jax.core.choices import EXTRACT_BY
from scope_jax.core.kinds import TRANSCODER_KINDS, transcoder_sites, transcoder_target
from scope_jax.layout import RunLayout, eval_identity
from scope_jax.models.sites import SITE_KINDS


@dataclasses.dataclass(frozen=True)
class Job:
  stage: str  # "extract" | "train" (train + export + eval)
  name: str  # e.g. "extract/L12-8B", "train/res.12-8B"
  workdir: str
  config: ml_collections.ConfigDict
  sites: tuple[str, ...]
  widths: tuple[int, ...] = ()
  tokens: int = 0

  @property
  def saes(self) -> int:
    c = self.config
    return len(self.widths) * len(c.sweep.l1_coefficients) * len(c.sweep.seeds)


def _tokens_name(tokens: int) -> str:
  for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
    if tokens >= size:
      return f"{tokens / size:g}{unit}"
  return str(tokens)


def site_widths(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Every site of the grid and the widths it trains."""
  g = config.grid
  if not g.layers:
    raise ValueError("config.grid.layers is empty: a sweep config lists the layers (and grid.kinds) to train")
  unknown = sorted(set(g.kinds) - set(SITE_KINDS))
  if unknown or not (g.kinds or g.transcoders):
    raise ValueError(
      f"config.grid.kinds {list(g.kinds)}: expected a subset of {list(SITE_KINDS)}, non-empty unless the grid "
      "trains grid.transcoders only"
    )
  widths = tuple(g.widths) or tuple(config.sweep.widths)
  out = {f"{kind}.{layer}": widths for layer in g.layers for kind in g.kinds}
  for site, own in g.site_widths:
    if site not in out:
      raise ValueError(f"config.grid.site_widths names {site}, which is not in the grid's layers × kinds")
    out[site] = tuple(own)
  if not all(out.values()):
    raise ValueError("config.grid: a site has no widths (grid.widths or sweep.widths is empty)")
  return out


def transcoder_widths(config: ml_collections.ConfigDict) -> dict[tuple[str, int], tuple[int, ...]]:
  """{(transcoder kind, layer): widths} of the grid (empty without `grid.transcoders`)."""
  g = config.grid
  unknown = sorted(set(g.transcoders) - set(TRANSCODER_KINDS))
  if unknown:
    raise ValueError(f"config.grid.transcoders {list(g.transcoders)}: expected a subset of {list(TRANSCODER_KINDS)}")
  widths = tuple(g.transcoder_widths) or tuple(g.widths) or tuple(config.sweep.widths)
  if g.transcoders and not widths:
    raise ValueError("config.grid: transcoders have no widths (grid.transcoder_widths, grid.widths, sweep.widths)")
  return {(kind, layer): widths for layer in g.layers for kind in g.transcoders}


def width_tokens(config: ml_collections.ConfigDict, width: int) -> int:
  """The token budget of a width: the first `(up_to_width, tokens)` of grid.tokens_by_width that
  covers it (the last one beyond), else extract.tokens."""
  budgets = sorted(config.grid.tokens_by_width)
  if not budgets:
    if not config.extract.tokens:
      raise ValueError("a sweep needs a token budget: extract.tokens or grid.tokens_by_width")
    return int(config.extract.tokens)
  return int(next((t for w, t in budgets if width <= w), budgets[-1][1]))


def plan(config: ml_collections.ConfigDict, workdir: str | Path) -> list[Job]:
  """The extraction jobs, then the trainer jobs, of a sweep config."""
  if config.grid.extract_by not in EXTRACT_BY:
    raise ValueError(f"config.grid.extract_by {config.grid.extract_by!r}: expected one of {EXTRACT_BY}")
  if not config.sweep.l1_coefficients:
    raise ValueError("config.sweep.l1_coefficients is empty: list the λ values to train")
  workdir = str(workdir).rstrip("/")
  # (site, budget) -> widths; (kind, layer, budget) -> widths; site -> the largest budget it needs
  train_groups: dict[tuple[str, int], list[int]] = {}
  for site, widths in site_widths(config).items():
    for w in widths:
      train_groups.setdefault((site, width_tokens(config, w)), []).append(w)
  transcoder_groups: dict[tuple[str, int, int], list[int]] = {}
  for (kind, layer), widths in transcoder_widths(config).items():
    for w in widths:
      transcoder_groups.setdefault((kind, layer, width_tokens(config, w)), []).append(w)
  budget = {}
  for site, tokens in train_groups:
    budget[site] = max(budget.get(site, 0), tokens)
  for _, layer, tokens in transcoder_groups:
    pair = transcoder_sites(layer)  # read as pairs from one store: one budget
    both = max(tokens, *(budget.get(s, 0) for s in pair))
    budget.update(dict.fromkeys(pair, both))
  transcoder_layers = {str(layer) for _, layer, _ in transcoder_groups}
  extraction_sets: dict[tuple[str, int], list[str]] = {}
  for site, tokens in budget.items():
    layer = site.split(".")[1]
    paired = (
      transcoder_target(site) if layer in transcoder_layers and transcoder_target(site) else site
    )  # one store per pair
    group = {"layer": f"L{layer}", "site": paired, "all": "all"}[config.grid.extract_by]
    extraction_sets.setdefault((group, tokens), []).append(site)

  jobs, store_of = [], {}
  stores = (config.extract.store or f"{workdir}/stores").rstrip("/")
  for (group, tokens), sites in extraction_sets.items():
    name = f"extract/{group}-{_tokens_name(tokens)}"
    store = f"{stores}/{group}-{_tokens_name(tokens)}"
    c = _copy(config)
    c.sites, c.extract.tokens, c.extract.store = tuple(sites), tokens, store
    jobs.append(Job("extract", name, store, c, tuple(sites), tokens=tokens))
    store_of.update({site: c for site in sites})
  for (site, tokens), widths in train_groups.items():
    name = f"train/{site}-{_tokens_name(tokens)}"
    c = _copy(store_of[site])  # the extraction's config: same store, data, model
    c.site, c.sweep.widths = site, tuple(widths)
    c.train.steps = max(1, tokens // c.train.batch_size)
    jobs.append(Job("train", name, f"{workdir}/{name}", c, (site,), tuple(widths), tokens))
  for (kind, layer, tokens), widths in transcoder_groups.items():
    name = f"train/{kind}.{layer}-{_tokens_name(tokens)}"
    c = _copy(store_of[transcoder_sites(layer)[0]])
    c.kind, (c.site, c.target_site), c.sweep.widths = kind, transcoder_sites(layer), tuple(widths)
    c.train.steps = max(1, tokens // c.train.batch_size)
    jobs.append(Job("train", name, f"{workdir}/{name}", c, (c.site, c.target_site), tuple(widths), tokens))
  return jobs


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def select(jobs: list[Job], patterns: str | None) -> list[Job]:
  """Jobs whose name matches one of the comma-separated fnmatch patterns (all when None)."""
  if not patterns:
    return jobs
  wanted = [p.strip() for p in patterns.split(",") if p.strip()]
  chosen = [j for j in jobs if any(fnmatch.fnmatch(j.name, p) for p in wanted)]
  if not chosen:
    raise ValueError(f"--jobs {patterns!r} matches none of the {len(jobs)} jobs (names like {jobs[0].name!r})")
  return chosen


def is_finished(job: Job, timeout: float | None = None) -> bool:
  """An extraction is finished when its store's manifest exists; a trainer job when its
  evaluation's (and, with `browse.enabled`, its browser's) marker holds what the job's config
  and latest checkpoint give (layout.py)."""
  if job.stage == "extract":
    return KV(job.workdir).read_json(MANIFEST, timeout=timeout) is not None
  from scope_jax.browse import browse_identity

  layout = RunLayout(job.workdir)
  browsed = not job.config.browse.enabled or layout.finished("browse", browse_identity(job.config, layout))
  return layout.finished("eval", eval_identity(job.config, layout)) and browsed


def table(jobs: list[Job]) -> str:
  """The job table `scope-jax sweep --dry-run` prints."""
  rows = [("#", "job", "sites", "widths", "λ", "SAEs", "tokens", "status")]
  unreachable = None
  for i, j in enumerate(jobs):
    status = "?"
    if unreachable is None:
      try:
        status = "done" if is_finished(j, timeout=20) else "to do"
      except Exception as e:  # e.g. a bucket this machine cannot reach: the table is still useful
        unreachable = f"status '?': cannot read {j.workdir} ({str(e).splitlines()[0][:200]})"
    rows.append(
      (
        str(i),
        j.name,
        ",".join(j.sites),
        "+".join(map(str, j.widths)) or "-",
        str(len(j.config.sweep.l1_coefficients)) if j.stage == "train" else "-",
        str(j.saes) if j.stage == "train" else "-",
        _tokens_name(j.tokens),
        status,
      )
    )
  sizes = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
  lines = ["  ".join(v.ljust(n) for v, n in zip(r, sizes)).rstrip() for r in rows]
  if unreachable:
    lines.append(unreachable)
  n_extract = sum(j.stage == "extract" for j in jobs)
  lines.append(
    f"{n_extract} extraction jobs, {len(jobs) - n_extract} trainer jobs, "
    f"{sum(j.saes for j in jobs if j.stage == 'train')} SAEs"
  )
  return "\n".join(lines)


def _size(n: float) -> str:
  for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n:.0f} B"


def _cost_key(job: Job) -> str:
  """What a trainer job's step depends on (two layers' jobs of one kind compile the same step)."""
  c = job.config
  site_kind = c.site.split(".")[0]
  fields = (c.model, c.kind, site_kind, c.sweep.to_dict(), c.train.batch_size, c.train.latent_block, c.precision)
  return repr(fields) + repr(c.mesh.to_dict())


def cost_table(jobs: list[Job], target_name: str, progress: bool = True) -> str:
  """The plan `scope-jax sweep --dry_run --target T` prints: per job what it needs on the target
  (scope_jax/train/plan.py says how each figure is made and what it leaves out), then totals."""
  import dataclasses

  from tqdm.auto import tqdm

  from scope_jax.parallel.devices import target
  from scope_jax.train.plan import PlanError, extract_cost, train_cost

  slice_ = target(target_name)
  kind = slice_.kind
  head = ("job", "mesh", "GB/chip", "fits", "tiling", "TFLOP/step", "ms/step peak", "ms @50.8%", "chip-h", "store")
  rows, compiled, hours, stored, failed = [head], {}, 0.0, 0, 0
  for job in tqdm(jobs, desc=f"plan on {target_name}", unit="job", disable=not progress):
    try:
      if job.stage == "extract":
        e = extract_cost(job.config, slice_)
        hours, stored = hours + e.device_hours, stored + e.store_bytes
        store = f"{_size(e.store_bytes)}, written at {_size(e.write_bytes_per_s)}/s"
        rows.append((job.name, "-", "-", "-", "-", "-", "-", "-", f"{e.device_hours:,.0f}", store))
        continue
      key = _cost_key(job)
      if key not in compiled:
        compiled[key] = train_cost(job.config, slice_)
      t = dataclasses.replace(compiled[key], steps=job.config.train.steps)
    except PlanError as e:
      failed += 1
      rows.append((job.name, f"cannot be planned: {e}", *[""] * (len(head) - 2)))
      continue
    hours += t.device_hours(slice_.chips)
    rows.append(
      (
        job.name,
        "×".join(str(n) for n in t.mesh.values()),
        f"{t.bytes_per_device / 1e9:.1f}",
        "yes" if t.fits else "NO",
        t.tiling,
        f"{t.flops_per_step / 1e12:.2f}",
        f"{1e3 * t.step_s_at_peak:.1f}",
        f"{1e3 * t.step_s_at_gemma_scope_mfu:.1f}",
        f"{t.device_hours(slice_.chips):,.0f}",
        "-",
      )
    )
  sizes = [max(len(r[k]) for r in rows if len(r[1]) < 60 or k != 1) for k in range(len(head))]
  lines = ["  ".join(v.ljust(n) for v, n in zip(r, sizes)).rstrip() for r in rows]
  too_big = sum(r[3] == "NO" for r in rows[1:])
  lines.append(
    f"{target_name}: {slice_.chips} × {kind.name} ({kind.memory_bytes / 1e9:.0f} GB each); "
    f"{hours:,.0f} chip-hours at Gemma Scope's 50.8% MFU; stores {_size(stored)}"
    + (f"; {too_big} jobs do not fit" if too_big else "")
    + (f"; {failed} jobs cannot be planned" if failed else "")
  )
  lines.append("estimates: memory from the CPU compiler, FLOPs by 12·B·d·M; loading and evaluation left out")
  return "\n".join(lines)
