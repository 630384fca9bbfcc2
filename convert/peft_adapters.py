"""PEFT LoRA adapter folders -> stacked MeteoRA experts.

A PEFT adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or, older,
`adapter_model.bin`, read only through `torch.load(weights_only=True)`). Its LoRA keys look like

    base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_B.weight   [out, r]

and adapter `i` adds `scaling * (x @ A.T) @ B.T` to the base linear, `scaling = alpha / r` (`alpha / sqrt(r)`
with `use_rslora`), where `r` and `alpha` come from `rank_pattern` / `alpha_pattern` when one of their keys
matches the module name (PEFT's rule: the pattern matches the whole name or a suffix after a dot; the first
matching key in file order wins), else from `r` / `lora_alpha`.

Which layers and modules an adapter covers is read from its weights (that is what PEFT loads; it reflects
`target_modules`, `layers_to_transform`, `layers_pattern` and `exclude_modules`). `fan_in_fan_out` is
recorded but changes nothing here: PEFT stores LoRA factors as `[r, in]` / `[out, r]` whatever its value
(it concerns the base weight of GPT-2 style `Conv1D` layers, and PEFT resets it to False on the
`nn.Linear` layers of a Llama).

Stacking (`read_adapters`): expert `e` of linear `(layer, module)` is `A[e] = lora_A.T` `[in, r]` and
`B[e] = lora_B.T` `[r, out]`, zero-padded to the largest rank (exact: zero rows add nothing); where an
adapter has no weights for a layer/module its A, B are zero and its scaling 0. What each adapter covers,
with its effective rank, alpha and scaling per layer, is recorded in `StackedAdapters.sources`, so that an
export can give back the original folders.

Refused (a `ConversionError` naming the folder and the reason): DoRA (`use_dora`), `bias` other than
"none", `lora_bias`, other PEFT types or LoRA variants, LoRA on `embed_tokens` or `lm_head`, trainable
tokens, `modules_to_save` that carry weights (unless `drop_modules_to_save=True`, which drops them with a
warning and records the dropped keys), tensors whose shapes or layer indices do not fit the base model,
unexpected or unpaired keys, missing files, and two adapters with the same name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from convert import ConversionError
from meteora_jax.config import LlamaConfig
from meteora_jax.llama import ATTN_MODULES, TARGET_MODULES
from meteora_jax.meteora import ExpertWeights, MeteoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
LORA_KEY = re.compile(r"base_model\.model\.((?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.lora_([AB])\.weight")
# Config fields of LoRA variants whose forward differs from plain LoRA (refused when set).
VARIANTS = ("use_dora", "lora_bias", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
            "kasa_config", "monteclora_config", "velora_config", "layer_replication", "target_parameters",
            "trainable_token_indices")


def module_shape(config: LlamaConfig, module: str) -> tuple[int, int]:
    """`(in_features, out_features)` of a target linear of the base model."""
    h, q, kv, f = (config.hidden_size, config.num_attention_heads * config.head_dim,
                   config.num_key_value_heads * config.head_dim, config.intermediate_size)
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}[module]


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup for a module name such as `model.layers.0.mlp.up_proj`:
    the first key (a regular expression) that matches the whole name or its end after a dot."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return patterns[key]
    return default


@dataclasses.dataclass
class StackedAdapters:
    """N adapters stacked as experts of every target linear.

    `names [E]`; `rank` r (the largest); `target_modules` (union, in `TARGET_MODULES` order);
    `experts[(layer, module)] = ExpertWeights(a [E, in, r], b [E, r, out], scaling [E] float32)` (numpy);
    `sources[e]`: `{"name", "folder", "weights_file", "adapter_config" (as read), "modules": {module:
    {"layers": [...], "rank": [...], "alpha": [...], "scaling": [...]}}, "dropped_modules_to_save": [...]}`.
    """

    names: tuple[str, ...]
    rank: int
    target_modules: tuple[str, ...]
    experts: dict[tuple[int, str], ExpertWeights]
    sources: tuple[dict[str, Any], ...]

    def meteora_config(self, **routing) -> MeteoraConfig:
        """A `MeteoraConfig` of these experts; `routing` sets `top_k`, `temperature`, ... (top_k default
        min(2, E))."""
        routing.setdefault("top_k", min(2, len(self.names)))
        return MeteoraConfig(expert_names=self.names, rank=self.rank, target_modules=self.target_modules,
                             **routing)

    def expert_sources(self) -> tuple[str, ...]:
        """`sources` as the JSON strings `MeteoraLlama(expert_sources=...)` stores."""
        return tuple(json.dumps(s, sort_keys=True) for s in self.sources)


@dataclasses.dataclass
class _Adapter:
    folder: Path
    config: dict[str, Any]
    weights_file: str
    factors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, int, float, float]]  # A [r,in], B [out,r], r, α, s
    dropped: list[str]


def _fail(folder: Path, reason: str) -> NoReturn:
    raise ConversionError(f"adapter {folder}: {reason}")


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        _fail(folder, "no such adapter folder")
    path = folder / CONFIG_FILE
    if not path.exists():
        _fail(folder, f"missing {CONFIG_FILE} (expected a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        _fail(folder, f"{CONFIG_FILE} is not valid JSON ({e})")
    if not isinstance(cfg, dict):
        _fail(folder, f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        _fail(folder, f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can become MeteoRA experts")
    if cfg.get("use_dora"):
        _fail(folder, "use_dora is set: DoRA adapters (weight-decomposed LoRA) are not supported")
    if cfg.get("bias", "none") != "none":
        _fail(folder, f"bias is {cfg['bias']!r}: adapters that train biases are not supported (expected 'none')")
    for key in VARIANTS:
        if cfg.get(key):
            _fail(folder, f"{key} is set ({cfg[key]!r}): this LoRA variant is not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for special in ("embed_tokens", "lm_head"):
            if special in targets:
                _fail(folder, f"LoRA on {special} is not supported (target_modules {sorted(targets)}); "
                              f"MeteoRA experts live in the decoder linears {TARGET_MODULES}")
    return cfg


def _read_tensors(folder: Path) -> tuple[str, dict[str, np.ndarray]]:
    st, binf = (folder / f for f in WEIGHT_FILES)
    if st.exists():
        from convert.hf_llama import _safe_open, _safetensors_keys

        keys = _safetensors_keys(st)
        handle = _safe_open(st)
        try:
            return st.name, {k: np.asarray(handle.get_tensor(k), np.float32) for k in keys}
        except Exception as e:
            _fail(folder, f"cannot read {st.name} ({e})")
    if binf.exists():
        import torch

        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            _fail(folder, f"cannot read {binf.name} with torch.load(weights_only=True) ({e})")
        if not isinstance(sd, dict):
            _fail(folder, f"{binf.name} does not hold a state dict")
        return binf.name, {k: v.detach().float().numpy() for k, v in sd.items()}
    _fail(folder, f"missing weights: neither {' nor '.join(WEIGHT_FILES)}")


def _classify_other(key: str, cfg: dict[str, Any]) -> str | None:
    """Reason to refuse a non-LoRA-linear key, or None if it is a `modules_to_save` weight."""
    if "lora_magnitude_vector" in key:
        return f"key {key!r} is a DoRA magnitude vector: DoRA adapters are not supported"
    if ".lora_" in key or "lora_embedding" in key:
        for special in ("embed_tokens", "lm_head"):
            if f".{special}." in key:
                return f"key {key!r}: LoRA on {special} is not supported"
        if key.endswith(".bias"):
            return f"key {key!r}: LoRA factors with a bias (lora_bias) are not supported"
    if "token_adapter" in key:
        return f"key {key!r}: trainable tokens are not supported"
    mts = cfg.get("modules_to_save") or []
    if any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", key) for m in mts):
        return None
    return f"unexpected key {key!r} (expected LoRA factors of {TARGET_MODULES} in decoder layers)"


def read_adapter(folder: str | Path, base_config: LlamaConfig, *, drop_modules_to_save: bool = False) -> _Adapter:
    """Read and check one adapter folder against the base model's shapes."""
    folder = Path(folder)
    cfg = _read_config(folder)
    weights_file, tensors = _read_tensors(folder)
    halves: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    dropped = []
    for key in sorted(tensors, key=lambda k: ("lora" not in k, k)):  # LoRA-ish keys first: clearer errors
        m = LORA_KEY.fullmatch(key)
        if m is None:
            reason = _classify_other(key, cfg)
            if reason is not None:
                _fail(folder, reason)
            dropped.append(key)
            continue
        layer, block, module, half = int(m.group(2)), m.group(3), m.group(4), m.group(5)
        expected_block = "self_attn" if module in ATTN_MODULES else "mlp"
        if module not in TARGET_MODULES or block != expected_block:
            _fail(folder, f"unexpected key {key!r} (not a LoRA factor of one of {TARGET_MODULES})")
        if layer >= base_config.num_hidden_layers:
            _fail(folder, f"key {key!r} is for layer {layer}, but the base model has "
                          f"{base_config.num_hidden_layers} layers (num_hidden_layers): adapter for another model?")
        halves.setdefault((layer, module), {})[half] = tensors[key]
        halves[(layer, module)]["name"] = m.group(1)
    if dropped:
        if not drop_modules_to_save:
            _fail(folder, f"modules_to_save {cfg.get('modules_to_save')} carry weights ({dropped[:3]}"
                          f"{' ...' if len(dropped) > 3 else ''}); MeteoRA cannot hold per-adapter copies of "
                          f"whole modules (pass drop_modules_to_save=True / --drop-modules-to-save to drop them)")
        warnings.warn(f"adapter {folder}: dropping modules_to_save weights {dropped} (they are not LoRA factors; "
                      f"the expert's outputs will differ from PEFT's where those modules matter)", stacklevel=2)
    if not halves:
        _fail(folder, f"{weights_file} holds no LoRA factors of {TARGET_MODULES}")
    factors = {}
    for (layer, module), h in sorted(halves.items()):
        name = h["name"]
        if "A" not in h or "B" not in h:
            has, lacks = ("A", "B") if "A" in h else ("B", "A")
            _fail(folder, f"{name} has lora_{has} but no lora_{lacks}")
        a, b = h["A"], h["B"]
        d_in, d_out = module_shape(base_config, module)
        r = pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out:
            _fail(folder, f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base model's "
                          f"{module} [in={d_in}, out={d_out}] (hidden_size {base_config.hidden_size}): "
                          f"expected lora_A [r, {d_in}] and lora_B [{d_out}, r]; adapter for another model?")
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            _fail(folder, f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not have the rank "
                          f"{r} that r / rank_pattern give")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors[(layer, module)] = (a, b, int(r), float(alpha), float(scaling))
    return _Adapter(folder, cfg, weights_file, factors, dropped)


def read_adapters(adapter_dirs: Sequence[str | Path], base_config: LlamaConfig, names: Sequence[str] | None = None,
                  *, drop_modules_to_save: bool = False) -> StackedAdapters:
    """Read N PEFT adapter folders and stack them as experts (see the module docstring).

    `names` default to the folder names; they must be unique (a `ConversionError` names the clashing folders).
    """
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise ConversionError("no adapter folders given")
    if names is None:
        names = [d.resolve().name for d in dirs]
    names = [str(n) for n in names]
    if len(names) != len(dirs):
        raise ConversionError(f"{len(names)} names for {len(dirs)} adapter folders")
    seen: dict[str, Path] = {}
    for n, d in zip(names, dirs, strict=True):
        if n in seen:
            raise ConversionError(f"adapter {d}: duplicate adapter name {n!r} (also {seen[n]}); expert names must "
                                  f"be unique (pass distinct names / --names)")
        seen[n] = d
    adapters = [read_adapter(d, base_config, drop_modules_to_save=drop_modules_to_save) for d in dirs]
    rank = max(f[2] for ad in adapters for f in ad.factors.values())
    covered = {m for ad in adapters for (_, m) in ad.factors}
    targets = tuple(m for m in TARGET_MODULES if m in covered)
    e = len(adapters)
    experts = {}
    for layer in range(base_config.num_hidden_layers):
        for module in targets:
            d_in, d_out = module_shape(base_config, module)
            a = np.zeros((e, d_in, rank), np.float32)
            b = np.zeros((e, rank, d_out), np.float32)
            s = np.zeros((e,), np.float32)
            for i, ad in enumerate(adapters):
                f = ad.factors.get((layer, module))
                if f is not None:
                    a[i, :, :f[2]], b[i, :f[2], :], s[i] = f[0].T, f[1].T, f[4]
            experts[(layer, module)] = ExpertWeights(a, b, s)
    sources = tuple(_source(n, ad) for n, ad in zip(names, adapters, strict=True))
    return StackedAdapters(tuple(names), int(rank), targets, experts, sources)


def _source(name: str, ad: _Adapter) -> dict[str, Any]:
    modules: dict[str, dict[str, list]] = {}
    for (layer, module), (_, _, r, alpha, scaling) in sorted(ad.factors.items(), key=lambda kv: kv[0]):
        rec = modules.setdefault(module, {"layers": [], "rank": [], "alpha": [], "scaling": []})
        for k, v in (("layers", layer), ("rank", r), ("alpha", alpha), ("scaling", scaling)):
            rec[k].append(v)
    order = {m: i for i, m in enumerate(TARGET_MODULES)}
    return {"name": name, "folder": ad.folder.resolve().name, "weights_file": ad.weights_file,
            "adapter_config": ad.config, "modules": dict(sorted(modules.items(), key=lambda kv: order[kv[0]])),
            "dropped_modules_to_save": ad.dropped}
