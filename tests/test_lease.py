"""The lease on a workdir or store: one holder, named to the next; a dead or silent holder's lease
is taken over; released only by its holder."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from scope_jax.lease import LEASE, STALE_AFTER_S, Lease, LeaseHeld


def _write(root, **holder):
  (root / LEASE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0} | holder))


def test_a_held_lease_names_its_holder_and_is_released_by_it(tmp_path):
  first = Lease(str(tmp_path), "workdir")
  first.acquire()
  with pytest.raises(LeaseHeld, match=rf"workdir {tmp_path} is in use by another job \(host .*, pid {os.getpid()}, "):
    Lease(str(tmp_path), "workdir").acquire()
  first.release()
  assert not (tmp_path / LEASE).exists()
  second = Lease(str(tmp_path), "workdir")
  second.acquire()
  second.release()


def test_the_lease_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write(tmp_path, pid=dead.pid, renewed=time.time())
  lease = Lease(str(tmp_path), "store")
  lease.acquire()
  assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
  lease.release()


def test_another_hosts_lease_is_respected_until_it_stops_being_renewed(tmp_path):
  _write(tmp_path, host="elsewhere", pid=1, renewed=time.time())
  with pytest.raises(LeaseHeld, match="host elsewhere, pid 1"):
    Lease(str(tmp_path), "workdir").acquire()
  _write(tmp_path, host="elsewhere", pid=1, renewed=time.time() - STALE_AFTER_S - 1)
  lease = Lease(str(tmp_path), "workdir")
  lease.acquire()
  lease.release()


def test_a_file_named_lease_that_is_not_one_is_left_alone_naming_it(tmp_path):
  """tensorstore writes a lease whole, so a LEASE that does not parse is not a torn lease: a user's."""
  for text in ('{"host": "x", "pi', "my own lease agreement", '["a", "list"]'):
    (tmp_path / LEASE).write_text(text)
    with pytest.raises(LeaseHeld, match=rf"{tmp_path}/LEASE is not a scope_jax lease; it is left as it is"):
      Lease(str(tmp_path), "workdir").acquire()
    assert (tmp_path / LEASE).read_text() == text


def test_a_taken_over_lease_is_not_deleted_by_its_old_holder_and_ends_its_job(tmp_path, monkeypatch):
  import scope_jax.lease as lease_module

  monkeypatch.setattr(lease_module, "RENEW_EVERY_S", 0.05)
  failures = []
  old = Lease(str(tmp_path), "workdir", on_failure=lambda thread, error: failures.append((thread, str(error))))
  old.acquire()
  _write(tmp_path, host="elsewhere", pid=1, renewed=time.time())  # someone took it over meanwhile
  deadline = time.time() + 30
  while not failures and time.time() < deadline:
    time.sleep(0.02)
  assert failures and failures[0][0] == f"lease renewal ({tmp_path}/LEASE)"  # the renewal found it and said so
  assert "taken over by another job (host elsewhere, pid 1" in failures[0][1]
  old.release()  # must not remove the new holder's lease
  assert json.loads((tmp_path / LEASE).read_text())["host"] == "elsewhere"


def test_holding_a_root_this_process_already_holds_is_a_no_op(tmp_path):
  """A sweep's extraction job: its workdir is its store, held twice by one process."""
  from scope_jax.lease import holding

  with holding(str(tmp_path), "workdir"):
    with holding(str(tmp_path / "." / ""), "store"):
      assert (tmp_path / LEASE).exists()
    assert (tmp_path / LEASE).exists()
  assert not (tmp_path / LEASE).exists()
