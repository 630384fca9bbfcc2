"""Llama decoder in Flax NNX.

Every target linear (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) is
built by an injected `LinearFactory`, so a MeteoRA linear (or anything else with the same call
signature) takes the place of the plain one without touching this file. A target linear is called as
`y, aux = linear(x)`; `aux` is `None` for a plain linear and a pytree (the routing of a MeteoRA linear)
otherwise. The model gathers the non-`None` aux of every layer into `LlamaOutput.aux`, stacked over
layers: `aux[module]` has a leading `[num_layers]` axis. Nothing leaves a call through side channels,
so the whole forward is a pure function under `nnx.jit`.

For generation a call may take a preallocated `KVCache` (per layer `k`, `v` `[B, S, Hkv, D]`, the key
validity mask `[B, S]` and the write index): the new keys and values are written at slots
`[index, index + T)`, queries attend to every valid cached key at or before their own slot, and the
updated cache comes back in `LlamaOutput.cache`. Without a cache the call is unchanged.

For inference, `meteora_jax.packed.pack_projections` replaces the linears that read one input (q/k/v, gate/up,
and o, down alone) by one packed projection each (`packed_qkv`, `packed_o`, `packed_gate_up`, `packed_down`):
one matrix product instead of several. The layers call a packed projection when it is there.

Weights are stored as `[in, out]` kernels (Hugging Face stores `[out, in]`; the converter transposes).
Module and attribute names follow Hugging Face's so that checkpoint keys map one to one.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.config import LlamaConfig

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_MODULES = TARGET_MODULES[:4]
MLP_MODULES = TARGET_MODULES[4:]


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, *, use_bias: bool, name: str, layer: int,
                 config: LlamaConfig, rngs: nnx.Rngs) -> nnx.Module: ...


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)`; kernel `[in, out]`. Returns `(y, None)` like every target linear."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.dtype(param_dtype)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.dtype(param_dtype))) if use_bias else None
        self.dtype = jnp.dtype(dtype)

    def base(self, x: jax.Array) -> jax.Array:
        """The plain linear map, `[..., in] -> [..., out]`."""
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array, forced: jax.Array | None = None) -> tuple[jax.Array, None]:
        del forced  # per-token forced experts: only MeteoRA linears have experts
        return self.base(x), None


def plain_linear(in_features, out_features, *, use_bias, name, layer, config, rngs) -> Linear:
    """The default `LinearFactory`: a plain `Linear`."""
    del name, layer
    return Linear(in_features, out_features, use_bias=use_bias, dtype=config.dtype,
                  param_dtype=config.param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """`x / rms(x) * scale`, computed in float32 and cast back (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * xf.astype(dtype)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (float32), with linear or llama3 scaling applied."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s.rope_type == "linear":
        inv = inv / np.float32(s.factor)
    elif s.rope_type == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. `x [B, T, H, D]`, `positions [B, T]`."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------- blocks
def project(parent: nnx.Module, packed: str, names: tuple[str, ...], x: jax.Array, aux: dict,
            forced: jax.Array | None = None, glu: bool = False) -> list[jax.Array]:
    """The outputs of the linears `names` of `parent` on one input `x`, through the packed projection
    `parent.<packed>` when packing made one; their aux (routing) go into `aux` under the linears' names.
    `forced`: per-token forced experts `[B, T]` (-1: the gate routes), see `Llama.__call__`. `glu` (two linears):
    `[silu(first) * second]` instead (a packed projection may compute it in its own kernel)."""
    group = getattr(parent, packed, None)
    if group is not None:
        outs, routings = group(x, forced, glu=glu)
        aux.update(routings)
        return outs
    outs = []
    for name in names:
        y, aux[name] = getattr(parent, name)(x, forced)
        outs.append(y)
    return [jax.nn.silu(outs[0]) * outs[1]] if glu else outs


def _make_linears(names, shapes, use_bias, layer, config, factory, rngs):
    return {n: factory(i, o, use_bias=use_bias, name=n, layer=layer, config=config, rngs=rngs)
            for n, (i, o) in zip(names, shapes, strict=True)}


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, factory: LinearFactory, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size)]
        for name, mod in _make_linears(ATTN_MODULES, shapes, c.attention_bias, layer, c, factory, rngs).items():
            setattr(self, name, mod)
        self.packed_qkv = self.packed_o = None  # set by meteora_jax.packed.pack_projections

    def __call__(self, x, positions, mask, inv_freq, aux: dict, kv=None, forced=None):
        """`x [B, T, hidden]`, `mask [B, T, S]` (S = T, or the cache length with `kv = (k, v, index)`,
        `k`/`v [B, S, Hkv, D]`). Returns `y` and, with `kv`, the updated `(k, v)`."""
        b, t, _ = x.shape
        q, k, v = project(self, "packed_qkv", ("q_proj", "k_proj", "v_proj"), x, aux, forced)
        g = self.num_heads // self.num_kv_heads
        q = apply_rope(q.reshape(b, t, self.num_heads, self.head_dim), positions, inv_freq)
        k = apply_rope(k.reshape(b, t, self.num_kv_heads, self.head_dim), positions, inv_freq)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if kv is not None:  # write this step's keys / values into the cache, attend over all of it
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        q = q.reshape(b, t, self.num_kv_heads, g, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, -1)
        (y,) = project(self, "packed_o", ("o_proj",), out, aux, forced)
        return y if kv is None else (y, kv)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, factory: LinearFactory, rngs: nnx.Rngs):
        c = config
        shapes = [(c.hidden_size, c.intermediate_size)] * 2 + [(c.intermediate_size, c.hidden_size)]
        for name, mod in _make_linears(MLP_MODULES, shapes, c.mlp_bias, layer, c, factory, rngs).items():
            setattr(self, name, mod)
        self.packed_gate_up = self.packed_down = None  # set by meteora_jax.packed.pack_projections

    def __call__(self, x, aux: dict, forced=None):
        (act,) = project(self, "packed_gate_up", ("gate_proj", "up_proj"), x, aux, forced, glu=True)
        (y,) = project(self, "packed_down", ("down_proj",), act, aux, forced)
        return y


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, factory: LinearFactory, rngs: nnx.Rngs):
        eps, pd = config.rms_norm_eps, config.param_dtype
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, param_dtype=pd)
        self.self_attn = Attention(config, layer, factory, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, param_dtype=pd)
        self.mlp = MLP(config, layer, factory, rngs)

    def __call__(self, x, positions, mask, inv_freq, kv=None, forced=None):
        aux: dict[str, Any] = {}
        h = self.self_attn(self.input_layernorm(x), positions, mask, inv_freq, aux, kv, forced)
        if kv is not None:
            h, kv = h
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x), aux, forced)
        aux = {k: v for k, v in aux.items() if v is not None}
        return (x, aux) if kv is None else (x, aux, kv)


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer for generation.

    `k[i]`, `v[i]`: layer i's `[B, S, Hkv, D]` (after RoPE); `valid [B, S]` bool: which slots hold real
    tokens (padding and unwritten slots are False); `index`: int32 scalar, the next slot to write.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def length(self) -> int:
        """S, the number of slots."""
        return self.valid.shape[1]


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
    """An empty `KVCache` of `length` slots for `batch` rows (dtype: the config's compute dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   jnp.zeros((batch, length), jnp.bool_), jnp.zeros((), jnp.int32))


class LlamaOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    aux: dict[str, Any]  # per target module, the linears' aux stacked over layers
    cache: KVCache | None = None  # the updated cache, when one was passed


class Llama(nnx.Module):
    """Llama causal LM. `Llama(config, rngs=nnx.Rngs(0), linear_factory=...)`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, linear_factory: LinearFactory = plain_linear):
        self.config = config
        pd = jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                                      param_dtype=pd, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, linear_factory, rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.param_dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=config.dtype,
            param_dtype=config.param_dtype, rngs=rngs)
        self.remat = False  # recompute each layer's activations in the backward pass (training memory)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None,
                 forced_experts: jax.Array | None = None) -> LlamaOutput:
        """`tokens [B, T]` int; `attention_mask [B, T]` (1 = real token, 0 = padding; left or right
        padding); `positions [B, T]` default to the count of real tokens before each one (with a cache:
        counting the cached ones too). With `cache` (see `KVCache`), the tokens fill slots
        `[cache.index, cache.index + T)` and attend to the cached ones; the caller keeps the index within
        the cache (`index + T <= S`, not checked inside jit).
        `forced_experts [B]` int (MeteoRA models): row i's tokens all go to expert `forced_experts[i]` with
        weight 1 in every MeteoRA linear, as `forced_expert` does for a whole model; -1 leaves the row to the
        model's own routing. Values must lie in -1..E-1 (not checked inside jit; `generate` checks them)."""
        b, t = tokens.shape
        forced = None
        if forced_experts is not None:
            forced_experts = jnp.asarray(forced_experts)
            if forced_experts.shape != (b,):
                raise ValueError(f"forced_experts must have one entry per row, shape ({b},); "
                                 f"got {forced_experts.shape}")
            forced = jnp.broadcast_to(forced_experts.astype(jnp.int32)[:, None], (b, t))
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        valid = attention_mask.astype(jnp.bool_)
        if cache is None:
            if positions is None:
                positions = default_positions(valid)
            causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
            mask = causal[None] & valid[:, None, :]  # [B, T(query), T(key)]
        else:
            if t > cache.length:
                raise ValueError(f"{t} tokens do not fit a KV cache of {cache.length} slots")
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))  # [B, S]
            if positions is None:
                positions = jax.lax.dynamic_slice_in_dim(default_positions(valid), index, t, axis=1)
            slots = index + jnp.arange(t)  # [T]
            causal = jnp.arange(cache.length)[None, :] <= slots[:, None]  # [T, S]
            mask = causal[None] & valid[:, None, :]  # [B, T(query), S(key)]
        inv_freq = jnp.asarray(rope_inv_freq(self.config))
        x = self.embed_tokens(tokens)
        per_layer, new_k, new_v = [], [], []
        for i, layer in enumerate(self.layers):
            if cache is None:
                call = nnx.remat(_call_layer) if self.remat else _call_layer
                x, aux = call(layer, x, positions, mask, inv_freq, forced)
            else:
                x, aux, (k, v) = layer(x, positions, mask, inv_freq, (cache.k[i], cache.v[i], cache.index), forced)
                new_k.append(k)
                new_v.append(v)
            per_layer.append(aux)
        x = self.norm(x)
        if self.lm_head is None:
            logits = self.embed_tokens.attend(x)
        else:
            logits, _ = self.lm_head(x)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if per_layer and per_layer[0] else {}
        if cache is not None:
            cache = KVCache(tuple(new_k), tuple(new_v), valid, cache.index + t)
        return LlamaOutput(logits.astype(jnp.float32), aux, cache)


def _call_layer(layer, x, positions, mask, inv_freq, forced=None):
    return layer(x, positions, mask, inv_freq, forced=forced)


def default_positions(valid: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row (0 for padding before the first)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def param_shapes(model: Llama) -> dict[str, tuple[tuple[int, ...], Any]]:
    """`{dotted.path: (shape, dtype)}` of every `nnx.Param` (and subclasses) of a model."""
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, p)): (tuple(v.shape), v.dtype) for p, v in nnx.to_flat_state(state)}


__all__ = ["Llama", "LlamaOutput", "KVCache", "init_cache", "Linear", "LinearFactory", "RMSNorm", "plain_linear",
           "TARGET_MODULES", "default_positions"]
