"""Frozen model configuration, read from Hugging Face `config.json` dicts.

`LlamaConfig.from_hf_config` covers Llama-2 and Llama-3/3.1 style configs, both the transformers-5
`rope_parameters` spelling and the older `rope_theta` + `rope_scaling` one (with `rope_type` or `type`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A configuration that this project cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is one of `ROPE_TYPES`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder, plus the dtypes to compute and store parameters in."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of parameters

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rope_scaling.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_scaling.rope_type!r} is not one of {ROPE_TYPES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected float32, bfloat16 or float16")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | Any, *, source: str = "config", **overrides) -> LlamaConfig:
        """Build from a Hugging Face Llama config (a dict, a `PretrainedConfig`, or a path to config.json).

        `source` names where the dict came from, for error messages. `overrides` set fields such as dtype.
        """
        if isinstance(hf, (str, os.PathLike)):
            source = str(hf)
            try:
                with open(hf) as f:
                    hf = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{source}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: not valid JSON ({e})") from None
        elif not isinstance(hf, Mapping):
            hf = hf.to_dict()
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'llama'")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act is {act!r}, expected 'silu'")
        if hf.get("pretraining_tp", 1) not in (1, None):
            pass  # pretraining_tp only changes how transformers slices matmuls; the math is the same
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        heads = hf["num_attention_heads"]
        rope_theta, scaling = _read_rope(hf, source)
        eos = hf.get("eos_token_id")
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)


def _read_rope(hf: Mapping[str, Any], source: str) -> tuple[float, RopeScaling]:
    """(rope_theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = dict(legacy)
    spec.update({k: v for k, v in params.items() if k != "rope_theta"})
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (expected one of {ROPE_TYPES})")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    kw = {k: spec[k] for k in fields if spec.get(k) is not None}
    return float(theta), RopeScaling(rope_type=rope_type, **kw)
