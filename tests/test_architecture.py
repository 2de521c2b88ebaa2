"""The package's shape: the pipeline's stages as its tree (setup.cfg's import-linter contracts)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_stage_imports_only_earlier_stages_and_the_core():
  done = subprocess.run(
    [
      sys.executable,
      "-c",
      "import sys, importlinter.cli as c; "
      "sys.exit(c.lint_imports(config_filename='setup.cfg', no_cache=True, no_logo=True))",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
  assert "2 kept, 0 broken" in done.stdout
