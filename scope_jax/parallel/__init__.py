"""Device mesh construction and logical-axis sharding rules."""

from scope_jax.parallel.mesh import DATA, MODEL, logical_sharding, make_mesh, put

__all__ = ["DATA", "MODEL", "logical_sharding", "make_mesh", "put"]
