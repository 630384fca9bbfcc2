"""`python -m convert info CKPT`: what a meteora-jax checkpoint holds, without loading its weights.

`checkpoint_info(path)` returns a JSON-able dict; `render_info(info)` formats it as text. Shapes come from
the stored config (the model is built abstractly); only the per-expert scalings (`[E]` per MeteoRA linear)
are read from the arrays.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert import ConversionError
from meteora_jax import checkpoint
from meteora_jax.config import LlamaConfig
from meteora_jax.llama import TARGET_MODULES

ROUTING_FIELDS = ("top_k", "temperature", "routing", "strategy", "forced_expert", "adapters_enabled")
SOURCE_FIELDS = ("folder", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "layers_to_transform")


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """Summary of a checkpoint (plain Llama or MeteoRA): config, experts, scalings, parameter counts/bytes."""
    from meteora_jax.meteora import ExpertParam, ExpertScaling, GateParam

    path = Path(path).absolute()
    try:
        meta = checkpoint.read_metadata(path)
    except checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
    config = LlamaConfig.from_dict(meta["llama"])
    abstract = nnx.eval_shape(lambda: checkpoint.build_model(config, meta))
    params = {k: {"count": 0, "bytes": 0} for k in ("base", "gate", "experts", "scaling")}
    for _, var in nnx.to_flat_state(nnx.state(abstract)):
        kind = ("gate" if isinstance(var, GateParam) else "experts" if isinstance(var, ExpertParam)
                else "scaling" if isinstance(var, ExpertScaling) else "base" if isinstance(var, nnx.Param) else None)
        if kind:
            n = int(np.prod(var.shape))
            params[kind]["count"] += n
            params[kind]["bytes"] += n * np.dtype(var.dtype).itemsize
    params["total"] = {k: sum(v[k] for v in params.values()) for k in ("count", "bytes")}
    c = config
    info: dict[str, Any] = {
        "path": str(path), "kind": "meteora" if "meteora" in meta else "llama",
        "base": {"layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                 "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                 "vocab_size": c.vocab_size, "dtype": c.dtype, "param_dtype": c.param_dtype,
                 "tie_word_embeddings": c.tie_word_embeddings, "rope_type": c.rope_scaling.rope_type,
                 "rope_theta": c.rope_theta},
        "params": params,
    }
    if "meteora" in meta:
        info["meteora"] = _meteora_info(path, meta, abstract)
    return info


def _meteora_info(path: Path, meta: dict[str, Any], abstract) -> dict[str, Any]:
    m = meta["meteora"]
    names = list(m["expert_names"])
    per_linear = _read_scalings(path, abstract)  # {(layer, module): [E]}
    scalings = {}
    for e, name in enumerate(names):
        by_module = defaultdict(list)
        for (_, module), s in sorted(per_linear.items(), key=lambda kv: (TARGET_MODULES.index(kv[0][1]), kv[0][0])):
            by_module[module].append(float(s[e]))
        flat = {v for vs in by_module.values() for v in vs}
        if len(flat) == 1:
            scalings[name] = flat.pop()
        else:
            scalings[name] = {mod: vs[0] if len(set(vs)) == 1 else vs for mod, vs in by_module.items()}
    sources = meta.get("expert_sources") or []
    src_info = []
    for s in sources:
        from convert.export import source_config

        cfg = source_config(s) or {}
        row = {k: cfg[k] for k in SOURCE_FIELDS if cfg.get(k) not in (None, {}, [])}
        if s.get("folder"):
            row["folder"] = s["folder"]
        src_info.append(row)
    return {"experts": names, "num_experts": len(names), "rank": m["rank"],
            "target_modules": list(m["target_modules"]), "routing": {k: m.get(k) for k in ROUTING_FIELDS},
            "scalings": scalings, "sources": src_info}


def _read_scalings(path: Path, abstract) -> dict[tuple[int, str], np.ndarray]:
    """The `ExpertScaling` arrays only (orbax partial restore; the whole state where that is unsupported)."""
    import orbax.checkpoint as ocp

    from meteora_jax.meteora import ExpertScaling

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(abstract, ExpertScaling))
    args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        got = ocp.PyTreeCheckpointer().restore(
            path / "state", args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True))
    except TypeError:  # an orbax without partial_restore
        got = nnx.state(checkpoint.load(path), ExpertScaling)
    except Exception as e:
        raise ConversionError(f"{path / 'state'}: cannot read the expert scalings ({type(e).__name__}: {e})") from None
    out = {}
    for p, leaf in nnx.to_flat_state(got):
        keys = [getattr(k, "key", k) for k in p]
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        out[(int(keys[1]), str(keys[3]))] = np.asarray(value)
    return out


def _size(n: int) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:.3g}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n} B"


def render_info(info: dict[str, Any]) -> str:
    """`checkpoint_info`'s dict as aligned text lines."""
    b = info["base"]
    lines = [f"checkpoint  {info['path']}",
             f"model       Llama, {b['layers']} layers, hidden {b['hidden_size']}, intermediate "
             f"{b['intermediate_size']}, heads {b['heads']} (kv {b['kv_heads']}, head_dim {b['head_dim']}), "
             f"vocab {b['vocab_size']}",
             f"dtype       compute {b['dtype']}, params {b['param_dtype']}; tied embeddings "
             f"{'yes' if b['tie_word_embeddings'] else 'no'}; rope {b['rope_type']} theta {b['rope_theta']:g}"]
    m = info.get("meteora")
    if m:
        r = m["routing"]
        forced = "" if r["forced_expert"] is None else f", forced expert {r['forced_expert']}"
        off = "" if r["adapters_enabled"] else ", adapters OFF"
        lines += [f"meteora     {m['num_experts']} experts, rank {m['rank']}, targets {', '.join(m['target_modules'])}",
                  f"routing     top_k {r['top_k']}, temperature {r['temperature']:g}, {r['routing']}, strategy "
                  f"{r['strategy']}{forced}{off}",
                  "experts     #  name  scaling  [source]"]
        for e, name in enumerate(m["experts"]):
            s = m["scalings"][name]
            text = f"{s:g}" if isinstance(s, float) else ", ".join(
                f"{mod} {v:g}" if isinstance(v, float) else f"{mod} {'/'.join(f'{x:g}' for x in v)}"
                for mod, v in s.items())
            src = m["sources"][e] if e < len(m["sources"]) else {}
            extra = "  [" + ", ".join(f"{k} {v}" for k, v in src.items()) + "]" if src else ""
            lines.append(f"            {e:<2} {name}  {text}{extra}")
    p = info["params"]
    parts = [f"{k} {_size(p[k]['count'])} ({_bytes(p[k]['bytes'])})" for k in ("base", "gate", "experts", "total")
             if p[k]["count"] or k in ("base", "total")]
    lines.append("parameters  " + ", ".join(parts))
    return "\n".join(lines)
