"""How fast XLA runs the decode products of a packed layer, by output dtype and column count.

For each (in, out) and token count N, a stack of `--layers` distinct bf16 weights [in, out] (more bytes than the
GPU's L2) is multiplied by x [N, in] inside one jitted scan, with a bf16 result and with an f32 result
(`preferred_element_type`), as `meteora_jax.packed` mode `extended` does with out = ld + gate + shrink columns.
Prints the median time per product and the bandwidth it reaches. Set XLA_FLAGS to compare XLA's GEMM choices.

    python experiments/probe_gemv.py --shapes 4096x4096,4096x4480,4096x6144,4096x7040 --tokens 1,16
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x4480,4096x6144,4096x7040,4096x28672,4096x29312,"
                   "14336x4096,14336x4480")
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    print(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)
    for shape in args.shapes.split(","):
        d, o = (int(v) for v in shape.split("x"))
        w = jax.random.normal(jax.random.key(0), (args.layers, d, o), jnp.bfloat16)
        for n in (int(t) for t in args.tokens.split(",")):
            x = jax.random.normal(jax.random.key(1), (n, d), jnp.bfloat16)
            for out in ("bfloat16", "float32"):
                pet = jnp.dtype(out)

                @jax.jit
                def run(x, w, pet=pet):
                    def body(c, wl):
                        y = jnp.dot(x + c[:, :1].astype(x.dtype), wl, preferred_element_type=pet)
                        return c + y[:, :1].astype(jnp.float32) * 1e-9, None
                    return jax.lax.scan(body, jnp.zeros((x.shape[0], 1), jnp.float32), w)[0]

                jax.block_until_ready(run(x, w))
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    jax.block_until_ready(run(x, w))
                    times.append(time.perf_counter() - t)
                us = 1e6 * float(np.median(times)) / args.layers
                print(json.dumps({"in": d, "out": o, "n": n, "result": out, "us": round(us, 2),
                                  "tb_s": round(d * o * 2 / us / 1e6, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
