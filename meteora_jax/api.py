"""`meteora_jax.from_pretrained`: one call from files (or a loaded base) to a model ready to run.

    import meteora_jax
    llama = meteora_jax.from_pretrained("models/llama")                      # a plain Llama
    model = meteora_jax.from_pretrained("models/llama", ["ad/math", "ad/code"], top_k=2, temperature=15.0)
    model = meteora_jax.from_pretrained("ckpt/meteora", forced_expert="code")  # a converted checkpoint
    model = meteora_jax.from_pretrained(llama, ["ad/math", "ad/code"])        # a base already loaded

`base` is a Hugging Face Llama folder (config.json + safetensors), a `.gguf` file, a meteora-jax checkpoint
folder (`meteora_jax.checkpoint.save`), or a `Llama` already in memory (its weights are shared, not copied).
With `adapters` (PEFT LoRA folders, `convert.peft_adapters`), the result is a `MeteoraLlama` whose experts
are those adapters in the order given; a checkpoint of a `MeteoraLlama` loads as one. Routing options
(`top_k`, `temperature`, `routing`, `strategy`, `forced_expert`, `adapters_enabled`) are applied to the
result; `forced_expert` may be an expert's index or its name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meteora_jax import checkpoint
from meteora_jax.llama import Llama
from meteora_jax.meteora import MeteoraLlama, attach_experts, set_routing

ROUTING_OPTIONS = ("top_k", "temperature", "routing", "strategy", "forced_expert", "adapters_enabled")


def load_base(path: str | os.PathLike, *, dtype: str | None = None) -> Llama:
    """A model from a meteora-jax checkpoint folder, a Hugging Face Llama folder, or a `.gguf` file.

    `dtype` (compute and storage) defaults to the checkpoint's own, or float32 for Hugging Face files.
    """
    path = Path(path)
    if path.is_dir() and (path / checkpoint.META_FILE).exists():
        return checkpoint.load(path, dtype=dtype, param_dtype=dtype)
    from convert.hf_llama import load_hf_llama

    return load_hf_llama(path, dtype=dtype or "float32")


def expert_index(expert: str | int, names: Sequence[str], what: str = "forced_expert") -> int:
    """The index of an expert given by name, by index, or by an index written as text (command lines)."""
    if isinstance(expert, str):
        if expert in names:
            return list(names).index(expert)
        if expert.isdigit() and int(expert) < len(names):
            return int(expert)
    elif isinstance(expert, int) and not isinstance(expert, bool) and 0 <= expert < len(names):
        return expert
    raise ValueError(f"{what}={expert!r} is not an expert name or index; experts: {list(names)}")


def _resolve_routing(routing: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    routing = dict(routing)
    forced = routing.get("forced_expert")
    if isinstance(forced, str):
        routing["forced_expert"] = expert_index(forced, names)
    top_k = routing.get("top_k")
    if top_k is not None and not 1 <= top_k <= len(names):
        raise ValueError(f"top_k must be in 1..{len(names)} (the number of experts), got {top_k}")
    return routing


def from_pretrained(base: str | os.PathLike | Llama, adapters: Sequence[str | os.PathLike] | None = None, *,
                    names: Sequence[str] | None = None, dtype: str | None = None, seed: int = 0,
                    drop_modules_to_save: bool = False, **routing) -> Llama:
    """A `Llama` (no adapters) or `MeteoraLlama` (adapters, or a MeteoRA checkpoint), ready to run.

    `adapters`: PEFT LoRA folders, one expert each (`names` default to the folder names). `seed` seeds the
    gates (`[in, E]`, random until trained). `dtype` applies when `base` is a path. `drop_modules_to_save`:
    see `convert.peft_adapters`. `**routing`: `top_k` (default min(2, E)), `temperature`, `routing`,
    `strategy`, `forced_expert` (index or name), `adapters_enabled`.
    """
    bad = sorted(set(routing) - set(ROUTING_OPTIONS))
    if bad:
        raise TypeError(f"unknown routing option(s) {bad}; expected some of {ROUTING_OPTIONS}")
    if isinstance(base, Llama):
        if dtype is not None:
            raise ValueError("dtype applies when loading base from files; this base is already loaded "
                             f"(dtype {base.config.dtype})")
        model = base
    else:
        model = load_base(base, dtype=dtype)
    if adapters is None:
        if isinstance(model, MeteoraLlama):
            return set_routing(model, **_resolve_routing(routing, model.meteora_config.expert_names))
        if routing:
            raise ValueError(f"routing options {sorted(routing)} need adapters: pass adapters=[...] or a "
                             "checkpoint of a MeteoRA model")
        return model
    if isinstance(model, MeteoraLlama):
        raise ValueError("base already has MeteoRA experts; pass meteora_jax.meteora.base_model(model) to attach "
                         "other adapters to its base")
    from convert.peft_adapters import read_adapters

    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    adapters = list(adapters)
    _resolve_routing(routing, names if names is not None else [Path(a).resolve().name for a in adapters])
    stacked = read_adapters(adapters, model.config, names, drop_modules_to_save=drop_modules_to_save)
    mcfg = stacked.meteora_config(**_resolve_routing(routing, stacked.names))
    return attach_experts(model, mcfg, stacked.experts, seed=seed, expert_sources=stacked.expert_sources())


def load_model(*, checkpoint: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
               adapters: Sequence[str | os.PathLike] | None = None, dtype: str | None = None, pack: bool = False,
               **routing) -> Llama:
    """The model a command line names: exactly one of `checkpoint` (meteora-jax) or `base` (Hugging Face folder
    or .gguf, with `adapters` attached); routing options given as None are left unchanged. `pack`: pack the
    projections for inference (`meteora_jax.packed`). ValueError on bad input, with the reason."""
    if (checkpoint is None) == (base is None):
        raise ValueError("give exactly one of a checkpoint or a base model")
    if adapters and checkpoint is not None:
        raise ValueError("adapters attach to a base model, not to a checkpoint")
    routing = {k: v for k, v in routing.items() if v is not None}
    model = from_pretrained(checkpoint if checkpoint is not None else base, adapters or None, dtype=dtype, **routing)
    if pack:
        from meteora_jax.packed import pack_projections

        pack_projections(model)
    return model
