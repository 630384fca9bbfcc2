"""A MeteoRA checkpoint -> one PEFT LoRA adapter folder per expert (`PeftModel.from_pretrained` loads each).

    OUT/<expert name>/adapter_config.json
    OUT/<expert name>/adapter_model.safetensors   base_model.model.{module}.lora_A.weight [r, in]
                                                  base_model.model.{module}.lora_B.weight [out, r]

with `lora_A = A[e, :, :r].T` and `lora_B = B[e, :r, :].T` (`A [E, in, R]`, `B [E, R, out]`, R the padded rank).

Where the checkpoint records the expert's source (`expert_sources[e]["adapter_config"]`, the adapter's own
`adapter_config.json`), that config is written back (alpha, use_rslora, rank_pattern, alpha_pattern,
target_modules, layers_to_transform ...) and each module is cut back to its own rank r; the export checks
that what it drops is zero and that the config's scaling is the checkpoint's. Without a source the expert
becomes a uniform-rank adapter on every MeteoRA linear with `lora_alpha = scaling * R` (an `alpha_pattern`
where scalings differ between modules). The gate has no PEFT counterpart and is not exported.

The output folder is written to a temporary sibling and renamed into place; an existing one is refused
unless `overwrite`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from convert import ConversionError
from convert.meteora_ckpt import PEFT_PREFIX, module_key, resolve_lora_config
from meteora_jax import checkpoint
from meteora_jax.meteora import MeteoraLlama, meteora_linears

SOURCE_CONFIG_KEYS = ("adapter_config", "config", "peft_config")  # where a source keeps the original config
_DROP = {"modules_to_save": None, "fan_in_fan_out": False, "inference_mode": True}


def source_config(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """The original `adapter_config.json` recorded in an expert source, if any."""
    for k in SOURCE_CONFIG_KEYS:
        cfg = (source or {}).get(k)
        if isinstance(cfg, dict) and "r" in cfg:
            return cfg
    return None


def folder_name(name: str) -> str:
    """An expert name as a folder name: characters other than letters, digits, `._-` become `_`."""
    safe = re.sub(r"[^\w.\-]", "_", name).strip(".") or "expert"
    return safe


def expert_adapters(model: MeteoraLlama) -> list[tuple[str, dict[str, Any], dict[str, np.ndarray]]]:
    """Per expert: `(name, adapter_config dict, {peft key: array})`; see the module docstring."""
    lins = {module_key(layer, m): lin for layer, m, lin in meteora_linears(model)}
    a_all = {k: np.asarray(lin.lora_a[...]) for k, lin in lins.items()}  # [E, in, R]
    b_all = {k: np.asarray(lin.lora_b[...]) for k, lin in lins.items()}  # [E, R, out]
    s_all = {k: np.asarray(lin.scaling[...]) for k, lin in lins.items()}  # [E]
    mcfg = model.meteora_config
    sources = [json.loads(s) for s in model.expert_sources]
    if sources and len(sources) != mcfg.num_experts:
        raise ConversionError(f"checkpoint records {len(sources)} expert sources for {mcfg.num_experts} experts")
    out = []
    for e, name in enumerate(mcfg.expert_names):
        source = sources[e] if sources else None
        orig, plan = source_config(source), source_plan(source, model.config.num_hidden_layers)
        if orig is None or plan is None:
            ranks = {k: mcfg.rank for k in lins}
            cfg = _fallback_config({k: float(s[e]) for k, s in s_all.items()}, mcfg.rank)
        else:
            ranks = _check_source(name, plan, lins, a_all, b_all, s_all, e)
            cfg = {**orig, **_DROP}
        tensors = {}
        for k, r in ranks.items():
            tensors[f"{PEFT_PREFIX}{k}.lora_A.weight"] = np.ascontiguousarray(a_all[k][e, :, :r].T)
            tensors[f"{PEFT_PREFIX}{k}.lora_B.weight"] = np.ascontiguousarray(b_all[k][e, :r, :].T)
        out.append((name, cfg, tensors))
    return out


def _fallback_config(scalings: dict[str, float], rank: int) -> dict[str, Any]:
    alphas = {k: s * rank for k, s in scalings.items()}
    common = Counter(alphas.values()).most_common(1)[0][0]
    modules = sorted({k.rsplit(".", 1)[1] for k in scalings})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": common,
            "target_modules": modules, "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != common},
            "rank_pattern": {}, "use_rslora": False, "bias": "none", "lora_dropout": 0.0,
            "base_model_name_or_path": None, **_DROP}


def source_plan(source: dict[str, Any] | None, num_layers: int) -> dict[str, tuple[int, float]] | None:
    """`{module_key: (r, scaling)}` an expert source describes: its recorded per-module `modules`
    (`{module: {"layers", "rank", "scaling", ...}}`) or else its `adapter_config`; None without either."""
    mods = (source or {}).get("modules")
    if isinstance(mods, dict) and mods and all(isinstance(v, dict) and "layers" in v for v in mods.values()):
        return {module_key(layer, m): (int(r), float(s)) for m, v in mods.items()
                for layer, r, s in zip(v["layers"], v["rank"], v["scaling"], strict=True)}
    cfg = source_config(source)
    if cfg is None:
        return None
    return {k: (r, s) for k, (r, _, s) in resolve_lora_config(cfg, num_layers).items()}


def _check_source(name, plan, lins, a_all, b_all, s_all, e) -> dict[str, int]:
    """`{module_key: r}` of a source plan; refuse if cutting the expert to it would change the expert."""
    ranks = {}
    for k, (r, scaling) in sorted(plan.items()):
        if k not in lins:
            raise ConversionError(f"expert {name!r}: its source adapts {k}, which has no experts in this "
                                  f"checkpoint (target modules {sorted({x.rsplit('.', 1)[1] for x in lins})})")
        rank = a_all[k].shape[-1]
        lost = np.any(a_all[k][e, :, r:], axis=0) & np.any(b_all[k][e, r:, :], axis=1)  # [R - r] rank-1 terms
        if r > rank or lost.any():
            raise ConversionError(f"expert {name!r}: {k} has non-zero weights beyond its adapter's rank {r} "
                                  f"(checkpoint rank {rank}); its source no longer describes it")
        if not np.isclose(s_all[k][e], scaling, rtol=1e-6, atol=0):
            raise ConversionError(f"expert {name!r}: {k} has scaling {float(s_all[k][e])!r} but its source "
                                  f"gives {scaling!r}")
        ranks[k] = r
    for k in sorted(set(lins) - set(plan)):
        if np.any(a_all[k][e]) and np.any(b_all[k][e]):
            raise ConversionError(f"expert {name!r}: non-zero weights at {k}, which its source does not adapt")
    return ranks


def export_peft(model_or_path: MeteoraLlama | str | os.PathLike, out: str | os.PathLike, *,
                overwrite: bool = False) -> list[Path]:
    """Write one PEFT adapter folder per expert under `out`; returns the folders (in expert order)."""
    out = checkpoint.check_writable(out, overwrite)  # refuse before loading anything
    model = model_or_path
    if not isinstance(model, MeteoraLlama):
        try:
            model = checkpoint.load(model_or_path)
        except checkpoint.CheckpointError as e:
            raise ConversionError(str(e)) from None
        if not isinstance(model, MeteoraLlama):
            raise ConversionError(f"{model_or_path}: a plain Llama checkpoint, no MeteoRA experts to export")
    adapters = expert_adapters(model)
    folders = [folder_name(n) for n, _, _ in adapters]
    dup = [f for f, c in Counter(folders).items() if c > 1]
    if dup:
        raise ConversionError(f"expert names {model.meteora_config.expert_names} give the same folder name {dup[0]!r}")

    def write(tmp: Path):
        from safetensors.numpy import save_file

        for folder, (_, cfg, tensors) in zip(folders, adapters, strict=True):
            (tmp / folder).mkdir(parents=True)
            save_file(tensors, str(tmp / folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))

    checkpoint.atomic_dir(out, write, overwrite)
    return [out / f for f in folders]
