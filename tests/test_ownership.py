"""Writers own only what they made: a user's folder or file in a writer's target, or beside it,
survives, or the write is refused naming it; scope_jax's own folders are replaced whole."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scope_jax as sj
from scope_jax.activations.store import KV, StoreError
from scope_jax.analysis.matching import write_match_report
from scope_jax.data import ArraySource
from scope_jax.export import export
from scope_jax.layout import (
  OWNER_FILE,
  NotOurs,
  new_staging,
  open_workdir,
  owned,
  replace_directory,
  staged_directory,
)
from scope_jax.parallel.mesh import make_mesh
from scope_jax.train import train
from tests.helpers import tree_hashes
from tests.sae.test_io import random_sae
from tests.test_layout import _config

REPO = Path(__file__).resolve().parents[1]


def _users_folder(path: Path) -> Path:
  """A folder of a user's files (and a sub-folder), as a research project holds them."""
  (path / "sub").mkdir(parents=True)
  (path / "notes.txt").write_text("my notes\n")
  (path / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
  return path


def _no_staging_left(folder: Path) -> None:
  left = [p.name for p in folder.iterdir() if ".staging-" in p.name or ".retired-" in p.name]
  assert not left, left


@pytest.mark.parametrize("fmt", ["gemma-scope-2", "saelens", "int8"])
def test_save_sae_never_replaces_a_users_folder_nor_touches_the_folders_beside_it(tmp_path, fmt):
  target = _users_folder(tmp_path / "mine")
  for beside in ("mine.partial", "mine.replaced"):  # names the writer used to stage and retire with
    _users_folder(tmp_path / beside)
  before = tree_hashes(tmp_path)
  with pytest.raises(NotOurs, match=rf"{target} is a folder scope_jax did not make \(it holds notes.txt, sub;"):
    sj.save_sae(random_sae(), target, format=fmt)
  assert tree_hashes(tmp_path) == before
  _no_staging_left(tmp_path)

  ours = sj.save_sae(random_sae(seed=1), tmp_path / "ours", format=fmt)  # a new folder: scope_jax's
  assert owned(ours) and (ours / OWNER_FILE).exists()
  sj.save_sae(random_sae(seed=2), ours, format=fmt)  # its own folder: replaced whole
  np.testing.assert_allclose(sj.load_sae(ours).b_enc, random_sae(seed=2).b_enc, atol=0.02)
  (tmp_path / "empty").mkdir()
  sj.save_sae(random_sae(), tmp_path / "empty", format=fmt)  # an empty folder holds nothing to lose
  after = tree_hashes(tmp_path)
  assert {k: after.get(k) for k in before} == before  # the user's folders, as they were
  _no_staging_left(tmp_path)


def test_save_sae_never_overwrites_a_params_npz_it_did_not_write(tmp_path):
  users = _users_folder(tmp_path / "mine")
  np.savez(users / "params.npz", mine=np.arange(3))
  before = tree_hashes(tmp_path)
  for path in (users, users / "params.npz"):
    with pytest.raises(NotOurs, match=rf"{users / 'params.npz'} exists and scope_jax did not write it"):
      sj.save_sae(random_sae(), path, format="gemma-scope")
  assert tree_hashes(tmp_path) == before
  written = sj.save_sae(random_sae(), users / "other.npz", format="gemma-scope")  # beside the user's files
  sj.save_sae(random_sae(seed=1), written, format="gemma-scope")  # its own file: replaced
  np.testing.assert_array_equal(sj.load_sae(written).W_enc, random_sae(seed=1).W_enc)
  assert {k: v for k, v in tree_hashes(tmp_path).items() if k in before} == before
  assert not [p for p in users.iterdir() if p.name.endswith(".tmp.npz")]


def test_a_folder_is_replaced_whole_only_when_it_is_scope_jaxs_and_a_failed_write_leaves_both(tmp_path):
  target = tmp_path / "site"
  with staged_directory(target, "test") as staging:
    (staging / "a.txt").write_text("1")
  assert owned(target) and (target / "a.txt").read_text() == "1"
  with pytest.raises(RuntimeError, match="midway"), staged_directory(target, "test") as staging:
    (staging / "b.txt").write_text("2")
    raise RuntimeError("midway")
  assert sorted(p.name for p in target.iterdir()) == [OWNER_FILE, "a.txt"]  # the old one, whole
  _no_staging_left(tmp_path)
  users = _users_folder(tmp_path / "users")
  staging = new_staging(tmp_path / "elsewhere", "test")
  before = tree_hashes(users)
  with pytest.raises(NotOurs):  # the user's folder made the target after the staging began
    replace_directory(staging, users)
  assert tree_hashes(users) == before and not staging.exists()  # the staging, not the user's, was removed


def test_a_workdir_that_is_not_a_run_is_refused_unless_asked_and_then_only_the_runs_names_are_written(tmp_path):
  project = _users_folder(tmp_path / "project")
  (project / "export").mkdir()
  (project / "export" / "figure.png").write_bytes(b"png")
  before = tree_hashes(project)
  with pytest.raises(NotOurs, match=rf"--workdir {project} is a folder that is not a scope_jax run \(it holds export"):
    open_workdir(project)
  with pytest.raises(NotOurs, match=rf"--workdir {project} already holds export, which a run writes"):
    open_workdir(project, use_existing=True)
  assert tree_hashes(project) == before
  (project / "export" / "figure.png").rename(project / "figure.png")
  (project / "export").rmdir()
  open_workdir(project, use_existing=True)
  assert owned(project / "export") and owned(project / "checkpoints") and not owned(project / "notes.txt")
  assert not owned(project / "sub")
  open_workdir(project)  # now a run: no flag needed
  assert open_workdir(tmp_path / "new") == tmp_path / "new" and owned(tmp_path / "new" / "anything")


def test_a_run_of_an_older_scope_jax_is_recognised_as_a_run(tmp_path):
  (tmp_path / "stages").mkdir()
  (tmp_path / "stages" / "export.json").write_text("{}")
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "index.json").write_text("[]")
  open_workdir(tmp_path)
  assert owned(tmp_path / "export")


def _source():
  return ArraySource(
    np.random.default_rng(0).normal(size=(1024, 16)).astype(np.float32), 64, make_mesh(data=4, model=2)
  )


def test_export_into_a_users_export_folder_is_refused_before_measuring_and_leaves_it(tmp_path):
  train(_config(10), tmp_path, _source(), progress=False)
  users = _users_folder(tmp_path / "export")
  before = tree_hashes(tmp_path)
  with pytest.raises(NotOurs, match=rf"{users} is a folder scope_jax did not make"):
    export(_config(10), tmp_path, _source(), progress=False)
  assert tree_hashes(tmp_path) == before
  _no_staging_left(tmp_path)


def test_training_beside_a_users_files_in_checkpoints_is_refused_and_leaves_them(tmp_path):
  users = _users_folder(tmp_path / "checkpoints")
  (users / "3").mkdir()  # a numbered folder orbax would take for a step (and prune)
  before = tree_hashes(tmp_path)
  with pytest.raises(NotOurs, match=rf"{users} holds files that are not scope_jax checkpoints \(notes.txt, sub\)"):
    train(_config(10), tmp_path, _source(), progress=False)
  assert tree_hashes(tmp_path) == before


def test_a_new_store_is_written_only_into_an_empty_place(tmp_path):
  users = _users_folder(tmp_path / "acts")
  with pytest.raises(StoreError, match=r"acts holds files that are not a scope_jax store \(notes.txt, sub/data.bin\)"):
    KV(str(users)).check_empty()
  KV(str(tmp_path / "new")).check_empty()


def test_match_writes_its_files_beside_a_users_and_never_over_them(tmp_path):
  users = _users_folder(tmp_path / "out")
  entries = [{"from": "res.1", "to": "res.2", "decoder": {"scores": [0.5, 0.9], "median": 0.7, "above_0.7": 0.5}}]
  files = write_match_report(entries, users)
  assert files["json"].exists() and (users / "notes.txt").read_text() == "my notes\n"
  write_match_report(entries, users)  # its own files: rewritten
  theirs = _users_folder(tmp_path / "theirs")
  (theirs / "matches.md").write_text("the user's own matches.md")
  before = tree_hashes(theirs)
  with pytest.raises(NotOurs, match="matches.md exists and scope_jax did not write it"):
    write_match_report(entries, theirs)
  assert tree_hashes(theirs) == before


def test_the_cli_refuses_a_users_folder_as_workdir_naming_it_and_writes_nothing(tmp_path):
  project = _users_folder(tmp_path / "project")
  (project / "browse").mkdir()
  npy = tmp_path / "acts.npy"
  np.save(npy, np.random.default_rng(0).normal(size=(2048, 16)).astype(np.float32))
  before = tree_hashes(project)
  cfg = f"{REPO}/configs/sweep_from_npy.py:path={npy},widths=64,steps=4,batch_size=256,runlocal"
  cmd = [sys.executable, "-m", "scope_jax.cli", "train", "--config", cfg, "--workdir", str(project)]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
  assert f"scope-jax train: --workdir {project} is a folder that is not a scope_jax run" in done.stderr
  adopted = subprocess.run([*cmd, "--use_existing_workdir"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert adopted.returncode == 1 and f"--workdir {project} already holds browse, which a run writes" in adopted.stderr
  assert tree_hashes(project) == before
  (project / "browse").rmdir()
  adopted = subprocess.run([*cmd, "--use_existing_workdir"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert adopted.returncode == 0, adopted.stderr
  assert {k: v for k, v in tree_hashes(project).items() if k in before} == before
