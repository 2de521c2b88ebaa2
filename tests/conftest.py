"""Test set-up: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os

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
