"""One of two real processes reading the first epoch of a store: `python -m tests.data.loader_worker ROOT OUT`."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

from scope_jax.parallel.distributed import initialize  # noqa: E402

initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from scope_jax.data.loader import StoreLoader  # noqa: E402
from scope_jax.parallel.mesh import make_mesh  # noqa: E402
from tests.data.stores import SITE  # noqa: E402

root, out = sys.argv[1], sys.argv[2]
loader = StoreLoader(root, SITE, batch_size=40, mesh=make_mesh(), seed=3, normalize=None)
(stream,) = loader.own_streams  # one stream per process by default
epoch_rows = loader.order.epoch_rows(stream, 0)
steps = -(-epoch_rows // loader.stream_batch)
ids = np.concatenate([loader.stream_rows(stream, s)[:, 0] for s in range(steps)])[:epoch_rows]
batch = loader.batch(0).x_bd  # a real global array built from both processes' rows
assert batch.shape == (40, 8) and len(batch.addressable_shards) == 2
loader.close()
np.save(f"{out}.{jax.process_index()}.npy", ids)

# with the number of streams fixed, the global batches do not depend on the process count
fixed = StoreLoader(root, SITE, batch_size=40, mesh=make_mesh(), seed=3, normalize=None, streams=4)
batches = np.stack([multihost_utils.process_allgather(fixed.batch(s).x_bd, tiled=True) for s in range(3)])
fixed.close()
np.save(f"{out}.streams4.{jax.process_index()}.npy", batches)
