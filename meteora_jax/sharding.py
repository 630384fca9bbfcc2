"""Sharding on a named device mesh: axes `data`, `fsdp` and `tensor`, partition rules, multi-host start-up.

Mesh: `--mesh data=2,fsdp=2,tensor=2` (sizes multiply to the device count; omitted axes are 1).
- `data`: batch split, params replicated.
- `fsdp`: batch split too, and every weight's non-tensor dimension split (ZeRO-3 style: XLA gathers
  weights per use and reduce-scatters their gradients).
- `tensor`: Megatron-style: q/k/v/gate/up split on their output, o/down on their input, vocab split.

A MeteoRA expert follows its base weight: `A [E, in, r]` takes the base's `in` split and `B [E, r, out]`
its `out` split, so `x @ A` and `(.) @ B` shard like `x @ W`. Gates `[in, E]` take the base's `in` split
(`gates="split"`, default) or stay replicated (`gates="replicated"`). A dimension that the mesh does not
divide stays unsplit. Batches are split over `("data", "fsdp")`; XLA propagates the rest.

Several hosts: `initialize_distributed(coordinator, num_processes, process_id)` (flags `--coordinator`,
`--num-processes`, `--process-id`) wraps `jax.distributed.initialize`; every host runs the same command and
the mesh spans all hosts' devices.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"  # split on the output features
ROW = r"(o_proj|down_proj)"  # split on the input features


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`"data=2,fsdp=1,tensor=1"` -> `{"data": 2, "fsdp": 1, "tensor": 1}` (missing axes are 1)."""
    sizes = dict.fromkeys(AXES, 1)
    if not spec:
        return sizes
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated axis=size with axes {AXES}, got {part!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(spec: str | dict[str, int] | None, devices=None) -> Mesh:
    sizes = parse_mesh(spec) if not isinstance(spec, dict) else {**dict.fromkeys(AXES, 1), **spec}
    devices = list(jax.devices() if devices is None else devices)
    n = int(np.prod([sizes[a] for a in AXES]))
    if n != len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices, {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape([sizes[a] for a in AXES]), AXES)


# (regex over the dotted parameter path, partition spec by dimension); first match wins
RULES: list[tuple[str, tuple]] = [
    (r"embed_tokens\.embedding$", ("tensor", "fsdp")),  # [V, D]
    (r"lm_head\.kernel$", ("fsdp", "tensor")),  # [D, V]
    (COLUMN + r"\.kernel$", ("fsdp", "tensor")),  # [in, out]
    (ROW + r"\.kernel$", ("tensor", "fsdp")),
    (COLUMN + r"\.bias$", ("tensor",)),
    (ROW + r"\.bias$", (None,)),
    (COLUMN + r"\.lora_a$", (None, "fsdp", None)),  # [E, in, r]: the base's in split
    (ROW + r"\.lora_a$", (None, "tensor", None)),
    (COLUMN + r"\.lora_b$", (None, None, "tensor")),  # [E, r, out]: the base's out split
    (ROW + r"\.lora_b$", (None, None, "fsdp")),
    (COLUMN + r"\.gate$", ("fsdp", None)),  # [in, E]
    (ROW + r"\.gate$", ("tensor", None)),
]


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, gates: str = "split") -> P:
    """The partition spec of one array at dotted `path` (params and their optimizer moments alike)."""
    for pattern, dims in RULES:
        if re.search(pattern, path):
            if pattern.endswith(r"\.gate$") and gates == "replicated":
                return P()
            if len(dims) != len(shape):
                return P()
            # leave unsplit what the mesh does not divide (tiny vocabularies, odd head counts)
            dims = tuple(d if d is None or shape[i] % mesh.shape[d] == 0 else None for i, d in enumerate(dims))
            return P(*dims)
    return P()


def state_shardings(state: nnx.State, mesh: Mesh, gates: str = "split") -> Any:
    """A pytree of `NamedSharding`s matching `state` (an nnx State of a model, optimizer, or both)."""
    flat = nnx.to_flat_state(state)
    specs = []
    for path, var in flat:
        dotted = ".".join(map(str, path))
        value = var.get_value() if hasattr(var, "get_value") else var
        specs.append((path, var.replace(NamedSharding(mesh, spec_for(dotted, tuple(np.shape(value)), mesh, gates)))))
    return nnx.from_flat_state(specs)


def shard_state(state: nnx.State, mesh: Mesh, gates: str = "split") -> nnx.State:
    """`state` with every array placed on the mesh by the rules."""
    shardings = state_shardings(state, mesh, gates)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays `[B, ...]`: split the batch over data and fsdp."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        if v.shape[0] % n:
            raise ValueError(f"batch size {v.shape[0]} is not divisible by data x fsdp = {n}")
        out[k] = jax.device_put(v, batch_sharding(mesh, v.ndim))
    return out


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-host run (no-op when `coordinator` is None). Call before anything touches devices."""
    if coordinator is None:
        return
    if num_processes is None or process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
