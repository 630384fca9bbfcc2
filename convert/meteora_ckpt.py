"""The original MeteoRA checkpoint layout (NJUDeepEngine/meteora) <-> `MeteoraLlama`.

The reference wraps a Llama in its PEFT fork: every target linear becomes a MoE-LoRA layer holding all
adapters concatenated, and the model's `state_dict()` is saved as safetensors, usually with the prefix
`base_model.model.` (detected here; any prefix or none works). Per decoder layer `i`, group
`g` (`self_attn` or `mlp`) and target module `m`:

    model.layers.{i}.{g}.{m}.base_layer.weight   [out, in]    the frozen base weight (and .bias)
    model.layers.{i}.{g}.{m}.lora_A.weight       [E*r, in]    rows e*r:(e+1)*r are adapter e's A
    model.layers.{i}.{g}.{m}.lora_B.weight       [out, E*r]   columns e*r:(e+1)*r are adapter e's B
    model.layers.{i}.{g}.{m}.moe_gate.weight     [E, in]      the gate (no bias)
    model.layers.{i}.{g}.{m}.weight              [out, in]    a linear without experts
    model.embed_tokens.weight, model.norm.weight, model.layers.{i}.*_layernorm.weight, lm_head.weight

Ours (`meteora_jax.meteora`):  A[e] = lora_A[e*r:(e+1)*r].T  [in, r],  B[e] = lora_B[:, e*r:(e+1)*r].T
[r, out],  G = moe_gate.T  [in, E];  in einsum terms A = lora_A.reshape(E, r, in) "eri->eir".

The layout carries neither the adapters' names nor their scalings (the reference reads them from the
PEFT adapter folders it concatenated, in its task-list order). They come from the user: the same adapter
folders (`adapter_config.json`: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, target_modules,
layers_to_transform), or explicit names and scalings. The reference slices expert e at `e*r` with its own
rank r, so all adapters must have the same rank at a module (rank_pattern may differ between modules;
lower ranks are zero-padded to the largest, exact). `config.json` comes from `--config`, the checkpoint's
folder or `--base`; base weights from the checkpoint or, where it has none, from `--base`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import ConversionError
from convert.hf_llama import _safe_open, _safetensors_keys, hf_key, load_hf_llama, load_params, read_config
from meteora_jax.config import ConfigError, LlamaConfig
from meteora_jax.llama import ATTN_MODULES, TARGET_MODULES, Llama
from meteora_jax.meteora import ExpertWeights, MeteoraConfig, MeteoraLlama, attach_experts, meteora_linears

PEFT_PREFIX = "base_model.model."
LEAVES = ("lora_A", "lora_B", "moe_gate")
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A|lora_B|moe_gate)\.weight")


def group(module: str) -> str:
    return "self_attn" if module in ATTN_MODULES else "mlp"


def module_key(layer: int, module: str) -> str:
    """The Hugging Face name of a target linear, `model.layers.{layer}.{self_attn|mlp}.{module}`."""
    return f"model.layers.{layer}.{group(module)}.{module}"


# ------------------------------------------------------------------------------ adapter configs
def resolve_lora_config(cfg: dict[str, Any], num_layers: int) -> dict[str, tuple[int, float, float]]:
    """`{module_key: (r, alpha, scaling)}` for every Llama target linear a PEFT LoRA config adapts.

    Follows PEFT's rules: `target_modules` a list (names matched as the key or its last parts), a regex
    (full match) or "all-linear"; `layers_to_transform` (with `layers_pattern`) and `exclude_modules`;
    `rank_pattern` / `alpha_pattern` keys matched as `(.*\\.)?(key)$`; scaling alpha/r, or alpha/sqrt(r)
    with `use_rslora`.
    """
    targets, exclude = cfg.get("target_modules"), cfg.get("exclude_modules")
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    pattern = cfg.get("layers_pattern")
    pattern = [pattern] if isinstance(pattern, str) else (pattern or [])
    out = {}
    for i in range(num_layers):
        for m in TARGET_MODULES:
            key = module_key(i, m)
            if _matches(exclude, key):
                continue
            if isinstance(targets, str) and targets.lower() == "all-linear":
                found = True
            elif isinstance(targets, str):
                found = re.fullmatch(targets, key) is not None
            else:
                found = _matches(targets, key)
                if found and layers:
                    pats = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in pattern] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
                    hit = next((h for h in (re.match(p, key) for p in pats) if h), None)
                    found = hit is not None and int(hit["idx"]) in layers
            if not found:
                continue
            r = int(_pattern_get(cfg.get("rank_pattern") or {}, key, cfg.get("r", 8)))
            alpha = float(_pattern_get(cfg.get("alpha_pattern") or {}, key, cfg.get("lora_alpha", 8)))
            out[key] = (r, alpha, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)
    return out


def _matches(names, key: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _pattern_get(patterns: dict, key: str, default):
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapter of a MeteoRA checkpoint: its name and where its scaling comes from.

    `modules` maps module keys to `(r, alpha, scaling)` (from an adapter folder); when it is None,
    `scaling` applies to every module and `rank` (if given) is checked against the layout.
    """

    name: str
    modules: dict[str, tuple[int, float, float]] | None = None
    scaling: float | None = None
    rank: int | None = None
    folder: str | None = None
    adapter_config: dict[str, Any] | None = None

    def lookup(self, layer: int, module: str) -> tuple[int | None, float] | None:
        """`(rank or None, scaling)` at a linear, or None if the adapter does not adapt it."""
        if self.modules is None:
            return self.rank, float(self.scaling)
        hit = self.modules.get(module_key(layer, module))
        return None if hit is None else (hit[0], hit[2])

    def source(self, linears: Sequence[tuple[int, str]]) -> dict[str, Any]:
        """The record stored in the checkpoint's `expert_sources` (the schema of `convert.peft_adapters`):
        `modules: {module: {"layers", "rank", "alpha", "scaling"}}` over the checkpoint's `linears`."""
        mods: dict[str, dict[str, list]] | None = None
        if self.modules is not None:
            mods = {}
            for layer, m in sorted(linears, key=lambda lm: (TARGET_MODULES.index(lm[1]), lm[0])):
                r, alpha, s = self.modules[module_key(layer, m)]
                rec = mods.setdefault(m, {"layers": [], "rank": [], "alpha": [], "scaling": []})
                for k, v in (("layers", layer), ("rank", r), ("alpha", alpha), ("scaling", s)):
                    rec[k].append(v)
        return {"name": self.name, "folder": self.folder, "adapter_config": self.adapter_config,
                "modules": mods, "scaling": self.scaling, "origin": "meteora-layout"}


def adapter_from_folder(folder: str | os.PathLike, config: LlamaConfig, name: str | None = None) -> AdapterInfo:
    """Read a PEFT adapter folder's `adapter_config.json` (only the config; the weights are in the layout)."""
    folder = Path(folder)
    path = folder / "adapter_config.json"
    if not path.exists():
        raise ConversionError(f"{folder}: no adapter_config.json (expected a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConversionError(f"{path}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    if cfg.get("use_dora"):
        raise ConversionError(f"{path}: use_dora is set; DoRA adapters have no MeteoRA layout")
    modules = resolve_lora_config(cfg, config.num_hidden_layers)
    if not modules:
        raise ConversionError(f"{path}: target_modules {cfg.get('target_modules')!r} adapt none of the Llama "
                              f"linears {TARGET_MODULES}")
    return AdapterInfo(name or folder.resolve().name, modules=modules, folder=folder.resolve().name, adapter_config=cfg)


def adapters_from_scalings(names: Sequence[str], scalings: Sequence[float],
                           ranks: Sequence[int] | None = None) -> list[AdapterInfo]:
    """Adapters given by name with one scaling each (and optionally their rank, checked against the layout)."""
    if len(names) != len(scalings) or (ranks is not None and len(ranks) != len(names)):
        raise ConversionError(f"{len(names)} names but {len(scalings)} scalings"
                              + ("" if ranks is None else f" and {len(ranks)} ranks") + ": give one each")
    return [AdapterInfo(n, scaling=float(s), rank=None if ranks is None else int(ranks[i]))
            for i, (n, s) in enumerate(zip(names, scalings, strict=True))]


# ------------------------------------------------------------------------------------ tensor files
class TensorFiles:
    """Lazily reads tensors from a .safetensors file, a folder of them, or a sharded set with an index."""

    def __init__(self, src: str | os.PathLike):
        src = Path(src)
        if src.is_file():
            files = {k: src for k in _safetensors_keys(src)}
        elif src.is_dir():
            index = sorted(src.glob("*.safetensors.index.json"))
            if len(index) > 1:
                raise ConversionError(f"{src}: several index files {[p.name for p in index]}; pass one file")
            if index:
                try:
                    weight_map = json.loads(index[0].read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConversionError(f"{index[0]}: expected JSON with a 'weight_map' ({e!r})") from None
                files = {k: src / f for k, f in weight_map.items()}
                for f in sorted(set(files.values())):
                    if not f.exists():
                        raise ConversionError(f"{index[0]}: lists shard {f.name}, which is missing from {src}")
            else:
                files = {}
                for f in sorted(src.glob("*.safetensors")):
                    for k in _safetensors_keys(f):
                        if k in files:
                            raise ConversionError(f"{f}: key {k!r} is also in {files[k]}")
                        files[k] = f
                if not files:
                    raise ConversionError(f"{src}: no .safetensors files")
        else:
            raise ConversionError(f"{src}: no such file or folder")
        self.src, self.files, self._open = src, files, {}

    def keys(self) -> set[str]:
        return set(self.files)

    def where(self, key: str) -> str:
        return str(self.files.get(key, self.src))

    def get(self, key: str) -> np.ndarray:
        f = self.files[key]
        if f not in self._open:
            self._open[f] = _safe_open(f)
        handle = self._open[f]
        try:
            return np.asarray(handle.get_tensor(key))
        except Exception as e:
            raise ConversionError(f"{f}: cannot read tensor {key!r} ({e})") from None


class _BaseView:
    """The base weights inside a MeteoRA layout under their plain Hugging Face names (a `load_params` source)."""

    def __init__(self, files: TensorFiles, hf_to_layout: dict[str, str]):
        self.tf, self.map, self.description = files, hf_to_layout, str(files.src)

    def keys(self) -> set[str]:
        return set(self.map)

    def where(self, key: str) -> str:
        return self.tf.where(self.map.get(key, key))

    def get(self, key: str) -> np.ndarray:
        return self.tf.get(self.map[key])


def _prefix(keys: set[str], src) -> str:
    for k in sorted(keys):
        m = re.match(r"(.*?)model\.(embed_tokens|layers)\.", k)
        if m:
            return m.group(1)
    raise ConversionError(f"{src}: no Llama keys (model.embed_tokens.* or model.layers.*): not a MeteoRA checkpoint")


# -------------------------------------------------------------------------------------------- import
def import_meteora(src: str | os.PathLike, adapters: Sequence[AdapterInfo], *, base: str | os.PathLike | None = None,
                   config: str | os.PathLike | LlamaConfig | None = None, dtype: str = "float32",
                   **routing) -> MeteoraLlama:
    """Build a `MeteoraLlama` from a checkpoint in the original layout (see the module docstring).

    `adapters` in the checkpoint's expert order. `routing`: `MeteoraConfig` options (`top_k` default 2 and
    `temperature` default 1, as in the reference).
    """
    tf = TensorFiles(src)
    cfg = llama_config(src, base, config, dtype)
    names = [a.name for a in adapters]
    if not names or len(set(names)) != len(names):
        raise ConversionError(f"adapter names must be non-empty and unique, got {names}")
    e = len(adapters)
    prefix = _prefix(tf.keys(), tf.src)
    keys = {}
    for k in tf.keys():
        if not k.startswith(prefix):
            raise ConversionError(f"{tf.where(k)}: key {k!r} lacks the prefix {prefix!r} of the other keys")
        keys[k[len(prefix):]] = k
    found: dict[tuple[int, str], dict[str, str]] = {}
    for k in sorted(keys):
        m = _EXPERT_KEY.fullmatch(k)
        if m is None:
            if re.search(r"\.(lora_\w+|moe_gate)\.", k):
                raise ConversionError(f"{tf.where(keys[k])}: unexpected key {keys[k]!r} (experts only on the "
                                      f"Llama linears {TARGET_MODULES} of layers 0..{cfg.num_hidden_layers - 1})")
            continue
        layer, grp, module, leaf = int(m[1]), m[2], m[3], m[4]
        if module not in TARGET_MODULES or grp != group(module) or layer >= cfg.num_hidden_layers:
            raise ConversionError(f"{tf.where(keys[k])}: unexpected key {keys[k]!r} (experts only on the "
                                  f"Llama linears {TARGET_MODULES} of layers 0..{cfg.num_hidden_layers - 1})")
        found.setdefault((layer, module), {})[leaf] = keys[k]
    if not found:
        raise ConversionError(f"{tf.src}: no MeteoRA expert keys (*.lora_A.weight, *.lora_B.weight, "
                              f"*.moe_gate.weight): not a checkpoint in the original MeteoRA layout")
    experts, gates, ranks = {}, {}, {}
    for (layer, module), leaves in sorted(found.items()):
        for leaf in LEAVES:
            if leaf not in leaves:
                have = next(iter(leaves.values()))
                raise ConversionError(f"{tf.where(have)}: missing key "
                                      f"{prefix}{module_key(layer, module)}.{leaf}.weight (beside {have!r})")
        experts[(layer, module)], gates[(layer, module)], ranks[(layer, module)] = _read_linear(
            tf, leaves, cfg, layer, module, adapters)
    rank = max(ranks.values())
    target_modules = tuple(m for m in TARGET_MODULES if any(mm == m for _, mm in found))
    for layer in range(cfg.num_hidden_layers):  # a target module absent from some layers: zero experts, exact
        for module in target_modules:
            if (layer, module) not in experts:
                d_in, d_out = _dims(cfg, module)
                experts[(layer, module)] = ExpertWeights(np.zeros((e, d_in, rank), np.float32),
                                                         np.zeros((e, rank, d_out), np.float32),
                                                         np.zeros((e,), np.float32))
                gates[(layer, module)] = np.zeros((d_in, e), np.float32)
    experts = {k: _pad(w, rank) for k, w in experts.items()}
    mcfg = MeteoraConfig(tuple(names), rank, target_modules, **routing)
    model = attach_experts(_base_model(tf, keys, found, cfg, base, prefix), mcfg, experts, gates=gates,
                           expert_sources=tuple(json.dumps(a.source(list(found)), sort_keys=True) for a in adapters))
    return model


def _dims(cfg: LlamaConfig, module: str) -> tuple[int, int]:
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, f),
            "up_proj": (h, f), "down_proj": (f, h)}[module]


def _read_linear(tf: TensorFiles, leaves: dict[str, str], cfg: LlamaConfig, layer: int, module: str,
                 adapters: Sequence[AdapterInfo]):
    """One linear's `(ExpertWeights [E, in, r] / [E, r, out] / [E], gate [in, E], r)`; every shape checked."""
    e, (d_in, d_out) = len(adapters), _dims(cfg, module)
    gate = tf.get(leaves["moe_gate"])
    if gate.ndim != 2 or gate.shape[1] != d_in:
        raise ConversionError(f"{tf.where(leaves['moe_gate'])}: {leaves['moe_gate']!r} has shape {gate.shape}, "
                              f"expected [num_adapters, {d_in}]")
    if gate.shape[0] != e:
        raise ConversionError(f"{tf.where(leaves['moe_gate'])}: {leaves['moe_gate']!r} has {gate.shape[0]} "
                              f"experts but {e} adapter names were given ({[a.name for a in adapters]}); "
                              f"give one per expert, in the checkpoint's order")
    a = tf.get(leaves["lora_A"])
    if a.ndim != 2 or a.shape[1] != d_in or a.shape[0] % e:
        raise ConversionError(f"{tf.where(leaves['lora_A'])}: {leaves['lora_A']!r} has shape {a.shape}, "
                              f"expected [E*r, {d_in}] with E = {e} adapters")
    r = a.shape[0] // e
    b = tf.get(leaves["lora_B"])
    if b.shape != (d_out, e * r):
        raise ConversionError(f"{tf.where(leaves['lora_B'])}: {leaves['lora_B']!r} has shape {b.shape}, "
                              f"expected [{d_out}, E*r] = [{d_out}, {e * r}] (lora_A gives r = {r})")
    scaling = np.zeros((e,), np.float32)
    for i, ad in enumerate(adapters):
        hit = ad.lookup(layer, module)
        where = f"adapter {ad.name!r}" + (f" ({ad.folder})" if ad.folder else "")
        if hit is None:
            raise ConversionError(f"{where}: does not adapt {module_key(layer, module)}, but the checkpoint "
                                  f"has experts there ({leaves['lora_A']!r})")
        if hit[0] is not None and hit[0] != r:
            raise ConversionError(f"{where}: rank {hit[0]} at {module_key(layer, module)}, but "
                                  f"{leaves['lora_A']!r} has {a.shape[0]} rows = E*r with E = {e}, r = {r}")
        scaling[i] = hit[1]
    a_stack = a.reshape(e, r, d_in).transpose(0, 2, 1)  # "eri->eir"
    b_stack = b.reshape(d_out, e, r).transpose(1, 2, 0)  # "oer->ero"
    return ExpertWeights(a_stack, b_stack, scaling), gate.T, r


def _pad(w: ExpertWeights, rank: int) -> ExpertWeights:
    r = w.a.shape[-1]
    if r == rank:
        return w
    return ExpertWeights(np.pad(w.a, ((0, 0), (0, 0), (0, rank - r))), np.pad(w.b, ((0, 0), (0, rank - r), (0, 0))),
                         w.scaling)


def llama_config(src, base=None, config=None, dtype: str = "float32") -> LlamaConfig:
    """The base model's config: `config` (a LlamaConfig or a config.json path), else config.json beside `src`,
    else in the `base` folder."""
    if isinstance(config, LlamaConfig):
        return config.replace(dtype=dtype, param_dtype=dtype)
    over = dict(dtype=dtype, param_dtype=dtype)
    if config is not None:
        return _config_file(Path(config), over)
    src = Path(src)
    for folder in ([src if src.is_dir() else src.parent] + ([Path(base)] if base else [])):
        if (folder / "config.json").exists():
            return read_config(folder, **over)
    raise ConversionError(f"{src}: no config.json beside the checkpoint; pass --config FILE or --base HF_FOLDER")


def _config_file(path: Path, over) -> LlamaConfig:
    try:
        return LlamaConfig.from_hf_config(path, **over)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def _base_model(tf: TensorFiles, keys: dict[str, str], found, cfg: LlamaConfig, base, prefix: str) -> Llama:
    """The plain Llama: from the checkpoint's own base weights, or from `base` if it has none."""
    expert_linears = {module_key(layer, m) for layer, m in found}
    hf_to_layout = {}
    for k, full in keys.items():
        if _EXPERT_KEY.fullmatch(k):
            continue
        m = re.fullmatch(r"(.*)\.base_layer\.(weight|bias)", k)
        if m and m[1] in expert_linears:
            hf_to_layout[f"{m[1]}.{m[2]}"] = full
        elif m:
            raise ConversionError(f"{tf.where(full)}: {full!r} is a wrapped base weight but the checkpoint has no "
                                  f"experts at {m[1]}")
        else:
            hf_to_layout[k] = full
    if not any(k.startswith("model.") for k in hf_to_layout):
        if base is None:
            raise ConversionError(f"{tf.src}: holds no base weights (only experts); pass --base HF_FOLDER")
        return load_hf_llama(base, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    view = _BaseView(tf, hf_to_layout)
    view.description = f"{tf.src} (prefix {prefix!r})" if prefix else str(tf.src)
    return load_params(abstract, view, param_dtype=jnp.dtype(cfg.param_dtype))


# ----------------------------------------------------------------------------------------- inverse
def to_meteora_layout(model: MeteoraLlama, *, prefix: str = PEFT_PREFIX) -> dict[str, np.ndarray]:
    """The original-layout tensors of a `MeteoraLlama` (what the reference's `state_dict()` would hold).

    Exact (transposes and reshapes only), at the model's padded rank. Scalings are not part of the
    layout: they stay in `model` (`ExpertScaling`) and `model.expert_sources`.
    """
    out: dict[str, np.ndarray] = {}
    wrapped = set()
    for layer, module, lin in meteora_linears(model):
        key = prefix + module_key(layer, module)
        wrapped.add(f"layers.{layer}.{group(module)}.{module}")
        a, b = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])  # [E, in, r], [E, r, out]
        e, d_in, r = a.shape
        out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.transpose(0, 2, 1).reshape(e * r, d_in))
        out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.transpose(2, 0, 1).reshape(-1, e * r))
        out[f"{key}.moe_gate.weight"] = np.ascontiguousarray(np.asarray(lin.gate[...]).T)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("gate", "lora_a", "lora_b"):
            continue
        dotted = ".".join(map(str, path))
        hf, transpose = hf_key(dotted)
        owner = dotted.rsplit(".", 1)[0]
        if owner in wrapped:
            hf = hf.rsplit(".", 1)[0] + ".base_layer." + hf.rsplit(".", 1)[1]
        arr = np.asarray(var.get_value())
        out[prefix + hf] = np.ascontiguousarray(arr.T if transpose else arr)
    return out
