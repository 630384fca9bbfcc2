"""Our Flax NNX Llama against transformers on tiny random models saved by transformers in the test."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rel_close, hf_logits, left_padded_batch, make_hf_llama

from convert.hf_llama import load_hf_llama
from meteora_jax.config import LlamaConfig


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers_fp32(kind, sharded, tmp_path):
    hf = make_hf_llama(kind, seed=1)
    if sharded:
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    else:
        hf.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
    ours = load_hf_llama(tmp_path)
    if kind == "llama3":
        c = ours.config
        assert c.tie_word_embeddings and c.num_key_value_heads < c.num_attention_heads
        assert c.rope_scaling.rope_type == "llama3" and c.head_dim == 24
        assert ours.lm_head is None
    tokens, mask = left_padded_batch(np.random.default_rng(2), hf.config.vocab_size)
    ref = hf_logits(hf, tokens, mask)
    got = ours(jnp.asarray(tokens), jnp.asarray(mask)).logits
    assert_rel_close(got, ref, mask, 1e-4)
    # a padded row gives the same logits as the row alone, unpadded
    n = int(mask[1].sum())
    alone = ours(jnp.asarray(tokens[1:2, -n:])).logits
    np.testing.assert_allclose(np.asarray(got)[1, -n:], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)


def test_bf16_close_to_fp32(hf_llama_dir):
    folder, hf = hf_llama_dir
    tokens, mask = left_padded_batch(np.random.default_rng(3), hf.config.vocab_size)
    ref = hf_logits(hf, tokens, mask)
    ours = load_hf_llama(folder, dtype="bfloat16")
    assert ours.embed_tokens.embedding[...].dtype == jnp.bfloat16
    got = ours(jnp.asarray(tokens), jnp.asarray(mask)).logits
    assert got.dtype == jnp.float32
    assert_rel_close(got, ref, mask, 5e-2)


def test_config_reads_both_rope_spellings():
    legacy = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
              "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    new = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}
    a, b = LlamaConfig.from_hf_config(legacy), LlamaConfig.from_hf_config(new)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.factor == 8.0 and a.rope_scaling.rope_type == "llama3"
    assert a.num_key_value_heads == 2 and a.head_dim == 4  # defaults: MHA, hidden / heads
    assert LlamaConfig.from_dict(a.to_dict()) == a


def test_hf_config_object_matches_dict():
    hf = make_hf_llama("llama3")
    assert LlamaConfig.from_hf_config(hf.config) == LlamaConfig.from_hf_config(hf.config.to_dict())
