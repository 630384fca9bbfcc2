"""Orbax round trip of a converted model, and its refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax import Llama, LlamaConfig, checkpoint

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, attention_bias=True)


def _leaves(model):
    return jax.tree.leaves(nnx.state(model))


def test_round_trip_is_bit_exact(tmp_path):
    model = Llama(CFG, rngs=nnx.Rngs(7))
    path = checkpoint.save(tmp_path / "ck", model)
    back = checkpoint.load(path)
    assert back.config == CFG
    for a, b in zip(_leaves(model), _leaves(back), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)))
    np.testing.assert_array_equal(np.asarray(model(tokens).logits), np.asarray(back(tokens).logits))
    # restore into an existing model of the same config
    other = Llama(CFG, rngs=nnx.Rngs(8))
    checkpoint.restore(path, other)
    for a, b in zip(_leaves(model), _leaves(other), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_round_trip(tmp_path):
    cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(1))
    back = checkpoint.load(checkpoint.save(tmp_path / "ck", model))
    for a, b in zip(_leaves(model), _leaves(back), strict=True):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_restore_into_other_config_is_refused(tmp_path):
    path = checkpoint.save(tmp_path / "ck", Llama(CFG, rngs=nnx.Rngs(0)))
    other = Llama(CFG.replace(num_hidden_layers=3), rngs=nnx.Rngs(0))
    with pytest.raises(checkpoint.CheckpointError, match=r"num_hidden_layers: checkpoint 2 != model 3"):
        checkpoint.restore(path, other)


def test_existing_output_refused_unless_overwrite(tmp_path):
    m1, m2 = Llama(CFG, rngs=nnx.Rngs(0)), Llama(CFG, rngs=nnx.Rngs(1))
    path = checkpoint.save(tmp_path / "ck", m1)
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(path, m2)
    back = checkpoint.load(path)  # the first one is intact
    np.testing.assert_array_equal(np.asarray(back.embed_tokens.embedding[...]),
                                  np.asarray(m1.embed_tokens.embedding[...]))
    checkpoint.save(path, m2, overwrite=True)
    back = checkpoint.load(path)
    np.testing.assert_array_equal(np.asarray(back.embed_tokens.embedding[...]),
                                  np.asarray(m2.embed_tokens.embedding[...]))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left behind


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint folder"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="not a meteora-jax checkpoint"):
        checkpoint.load(tmp_path / "empty")
