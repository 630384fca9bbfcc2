"""Shared fixtures: tiny random Llama models built and saved by transformers inside the tests."""

from __future__ import annotations

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

LLAMA2_STYLE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False,
)
LLAMA3_STYLE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
    tie_word_embeddings=True,
)


def make_hf_llama(kind: str = "llama2", seed: int = 0, **overrides):
    """A random transformers LlamaForCausalLM (float32, eval mode) of one of the two tiny styles."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(LLAMA2_STYLE if kind == "llama2" else LLAMA3_STYLE)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():  # norms default to ones: make them random so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def smollm2():
    """(GGUF path, transformers model in float32, tokenizer) of the real SmolLM2-135M-Instruct, loaded once: reading
    the GGUF through transformers takes most of a minute on a 2-core CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from convert.hf_llama import load_tokenizer, smollm2_gguf

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return path, hf, load_tokenizer(path)


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    """(our Llama, transformers model, folder) of a tiny random llama3-style model (GQA, tied, llama3 rope)."""
    from convert.hf_llama import load_hf_llama

    hf = make_hf_llama("llama3", seed=5)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return load_hf_llama(folder), hf, folder


@pytest.fixture(params=["llama2", "llama3"])
def hf_llama_dir(request, tmp_path):
    """(folder, transformers model) saved as one safetensors file."""
    model = make_hf_llama(request.param)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths=(7, 4, 1), total=9):
    """`tokens [B, total]`, `mask [B, total]`: left-padded rows of the given lengths."""
    b = len(lengths)
    tokens = rng.integers(1, vocab, size=(b, total))
    mask = np.zeros((b, total), np.int64)
    for i, n in enumerate(lengths):
        mask[i, total - n:] = 1
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask


def hf_logits(model, tokens, mask):
    """transformers logits with the positions a left-padded generate uses."""
    import torch

    tok = torch.tensor(tokens)
    m = torch.tensor(mask)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=tok, attention_mask=m, position_ids=pos).logits.float().numpy()


def assert_rel_close(ours, ref, mask, rtol):
    """max |ours - ref| over real tokens <= rtol * max |ref|."""
    sel = np.asarray(mask).astype(bool)
    ours, ref = np.asarray(ours)[sel], np.asarray(ref)[sel]
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    assert err <= rtol * scale, f"max abs err {err:.3g} > {rtol} * {scale:.3g}"


def one_layer_extended(shape: dict, experts: int, rank: int) -> dict:
    """A one-layer bf16 MeteoraLlama of `shape` (a bench SHAPES entry), packed in mode `extended`: its packed
    projections by group name (`qkv`, `o`, `gate_up`, `down`, in `meteora_jax.packed.GROUPS` order)."""
    from flax import nnx

    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama
    from meteora_jax.packed import GROUPS, pack_projections

    cfg = LlamaConfig(**dict(shape, num_hidden_layers=1, vocab_size=64), dtype="bfloat16", param_dtype="bfloat16")
    model = pack_projections(MeteoraLlama(cfg, MeteoraConfig(tuple(f"e{i}" for i in range(experts)), rank),
                                          rngs=nnx.Rngs(0)), mode="extended")
    layer = model.layers[0]
    return {attr.removeprefix("packed_"): getattr(getattr(layer, part), attr) for part, attr, _ in GROUPS}
