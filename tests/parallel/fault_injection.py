"""`python -m tests.parallel.fault_injection FAULT scope-jax-args...`: the CLI with a fault injected
into one background thread (for tests/parallel/test_thread_failures.py). When the fault is raised,
its time is written to $SCOPE_JAX_FAULT_AT, so the test can measure how long the process lives on."""

import os
import sys
import threading
import time


def _fault(what: str) -> RuntimeError:
  with open(os.environ["SCOPE_JAX_FAULT_AT"], "w") as f:
    f.write(repr(time.time()))
  return RuntimeError(f"injected fault in the {what}")


def inject(fault: str) -> None:
  if fault == "loader":
    from scope_jax.data.loader import StoreLoader

    local_rows = StoreLoader.local_rows

    def failing_rows(self, step):
      if step >= 3:
        raise _fault("loader")
      return local_rows(self, step)

    StoreLoader.local_rows = failing_rows
  elif fault == "tokenizer":
    from scope_jax.activations import extract

    kept = extract.kept_documents

    def failing(config):
      for i, doc in enumerate(kept(config)):
        if i == 1:  # the text source runs out of budget within a few documents
          raise _fault("tokenizer")
        yield doc

    extract.kept_documents = failing
  elif fault == "writer":
    from scope_jax.activations.writer import ShardWriter

    def flush(self, batches_done, finished=False):
      raise _fault("writer")

    ShardWriter.flush = flush
  elif fault == "lease renewal":
    from scope_jax import lease

    lease.RENEW_EVERY_S = 0.5
    write = lease.Lease._write

    def failing(self, record, if_equal):
      if threading.current_thread().name.startswith("lease"):
        raise _fault("lease renewal")
      return write(self, record, if_equal)

    lease.Lease._write = failing
  else:
    raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
  inject(sys.argv[1])
  from scope_jax.cli import main

  main(sys.argv[2:])
