"""Per-shard execution for batches sharded over explicit mesh axes.

The rasteriser flattens its pose batch (one flat scatter over all poses is the
fast path on CPU). Under JAX's explicit sharding (``jax.make_mesh`` meshes,
whose axes are ``AxisType.Explicit`` by default) such reshapes of a sharded
dimension are type errors, and even under automatic sharding a flat scatter
with computed indices gives the partitioner nothing to split on. Every pose is
independent, so when the batch dims carry explicit mesh axes we simply run the
whole computation per shard with ``shard_map``: no communication, and the
same code path as on one device.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, PartitionSpec as P


def _names(entry):
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec(x):
    """(abstract mesh or None, full per-dim spec tuple) of an array's type."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
        return None, (None,) * x.ndim
    spec = tuple(sharding.spec)
    return mesh, spec + (None,) * (x.ndim - len(spec))


def batch_mesh(x, batch_ndim):
    """The mesh if ``x``'s leading ``batch_ndim`` dims use explicit mesh axes, else None."""
    mesh, spec = _spec(x)
    if mesh is None:
        return None
    explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
    used = {n for e in spec[:batch_ndim] for n in _names(e)}
    return mesh if used & explicit else None


def per_shard(fn, args, batch_ndims, out_batch, out_ndims):
    """Runs ``fn(*args)`` per shard of the batch dims when they are explicitly sharded.

    args: arrays; batch_ndims: per arg, how many leading dims are batch dims
      (their sharding is kept, other dims are replicated).
    out_batch: the arg whose batch-dim spec the outputs take; out_ndims: a
      pytree matching fn's output with a ``(batch_ndim, ndim)`` pair per array.
    Falls back to a plain call when nothing is explicitly sharded.
    """
    mesh = None
    for a, nb in zip(args, batch_ndims):
        if nb:
            mesh = mesh or batch_mesh(a, nb)
    if mesh is None:
        return fn(*args)
    in_specs, local_args = [], []
    for a, nb in zip(args, batch_ndims):
        _, spec = _spec(a)
        want = spec[:nb] + (None,) * (a.ndim - nb)
        if want != spec:
            a = jax.sharding.reshard(a, P(*want))
        in_specs.append(P(*want))
        local_args.append(a)
    _, bspec = _spec(out_batch)

    def is_pair(t):
        return isinstance(t, tuple) and len(t) == 2 and all(isinstance(v, int) for v in t)

    out_specs = jax.tree.map(lambda t: P(*(bspec[:t[0]] + (None,) * (t[1] - t[0]))),
                             out_ndims, is_leaf=is_pair)
    # check_vma=False: the loops' carries start replicated (constants) and
    # become per-shard; every shard is independent, so there is nothing to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)(*local_args)
