"""Does XLA's CPU convolution give the same bits whatever the number of devices?

A multi-process run (``nvsm-launch``, 2 processes x 4 CPU devices) and a one-process
run (1 x 8) differ in two ways: the collective that sums the devices' gradients
(gloo across processes, XLA's own in one process) and the number of devices each
process holds. This isolates the second. In a fresh process per device count
(``--xla_force_host_platform_device_count=N``), with no sharding and no collective,
it computes one convolution's weight gradient on fixed data, jitted on the first
device, and compares its bits with the 1-device process's.

The default shape is MCSS ``tiny``'s stem (a 7x7, stride-2 conv from 3 to 8
channels on 32x32 crops, 2 rows: one device's share of the batch). ``--shape``
takes ``batch,size,in,out,kernel,stride``.

    python -m benchmarks.conv_bits --counts 1,2,4,6,8,16 --json runs/bench/conv_bits.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def _gradient(shape: tuple[int, ...], out: str) -> None:
    """In this process: the weight gradient of sum(conv(x, w) * c) -> ``out`` (.npy)."""
    import jax
    import jax.numpy as jnp

    batch, size, cin, cout, k, stride = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    w = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
    y = -(-size // stride)
    c = rng.standard_normal((batch, y, y, cout)).astype(np.float32)

    def loss(w, x, c):
        z = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(z * c)

    np.save(out, np.asarray(jax.jit(jax.grad(loss))(w, x, c)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,4,6,8,16", help="device counts, comma-separated")
    ap.add_argument("--shape", default="2,32,3,8,7,2", help="batch,size,in,out,kernel,stride")
    ap.add_argument("--json", default="", help="also write the table here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if args._child:
        _gradient(shape, args._child[1])
        return {}
    counts = [int(v) for v in args.counts.split(",")]
    if 1 not in counts:
        counts = [1, *counts]
    grads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = os.path.join(tmp, f"{n}.npy")
            flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count"))
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())
            subprocess.run([sys.executable, "-m", "benchmarks.conv_bits", "--shape", args.shape,
                            "--_child", str(n), out], check=True, env=env)
            grads[n] = np.load(out)
    ref = grads[1]
    rows = [{"devices": n, "same_bits_as_1": bool(np.array_equal(g, ref)),
             "elements_differing": int(np.sum(g != ref)), "elements": int(g.size),
             "max_abs_difference": float(np.abs(g - ref).max()),
             "max_abs_gradient": float(np.abs(ref).max())} for n, g in grads.items()]
    print(f"conv weight gradient, shape {args.shape} (batch,size,in,out,kernel,stride)")
    print("| devices in the process | same bits as 1 device | elements differing | max |diff| |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['same_bits_as_1']} | {r['elements_differing']} / "
              f"{r['elements']} | {r['max_abs_difference']:.2e} |")
    result = {"shape": args.shape, "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
