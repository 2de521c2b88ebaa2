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


def test_a_torn_lease_is_stale_and_a_taken_over_lease_is_not_deleted_by_its_old_holder(tmp_path):
  (tmp_path / LEASE).write_text('{"host": "x", "pi')
  old = Lease(str(tmp_path), "workdir")
  old.acquire()
  _write(tmp_path, host="elsewhere", pid=1, renewed=time.time())  # someone took it over meanwhile
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
