"""jax.distributed set-up from flags and environment: the errors come before any connection."""

import pytest

from scope_jax.parallel.distributed import initialize

VARIABLES = (
  "SCOPE_JAX_COORDINATOR",
  "SCOPE_JAX_NUM_PROCESSES",
  "SCOPE_JAX_PROCESS_ID",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SCOPE_JAX_DISTRIBUTED",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for name in VARIABLES:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_nothing_set_means_one_process():
  assert initialize() is False


def test_flag_and_environment_disagreeing_name_both(clean_env):
  clean_env.setenv("SCOPE_JAX_NUM_PROCESSES", "4")
  with pytest.raises(
    ValueError, match="num_processes is given differently by --num_processes=2 and SCOPE_JAX_NUM_PROCESSES=4"
  ):
    initialize("127.0.0.1:1234", 2, 0)


def test_scope_jax_and_slurm_variables_disagreeing(clean_env):
  clean_env.setenv("SCOPE_JAX_PROCESS_ID", "1")
  clean_env.setenv("SLURM_PROCID", "3")
  with pytest.raises(ValueError, match="SCOPE_JAX_PROCESS_ID=1 and SLURM_PROCID=3"):
    initialize("127.0.0.1:1234")


def test_a_process_count_without_a_coordinator(clean_env):
  clean_env.setenv("SLURM_NTASKS", "8")
  with pytest.raises(ValueError, match="8 processes are expected but no coordinator is given"):
    initialize()
  clean_env.setenv("SCOPE_JAX_DISTRIBUTED", "off")
  assert initialize() is False


@pytest.mark.parametrize(
  "count, index, message",
  [
    (2, 2, r"process_id 2 is outside \[0, num_processes=2\)"),
    (None, 0, "the process count or id is not"),
    ("two", 0, "num_processes='two' is not an integer"),
  ],
)
def test_bad_counts_and_ids(clean_env, count, index, message):
  if count is not None:
    clean_env.setenv("SCOPE_JAX_NUM_PROCESSES", str(count))
  with pytest.raises(ValueError, match=message):
    initialize("127.0.0.1:1234", None, index)
