"""Reference forward strategies of the MeteoRA adapter term (pure JAX; the fused kernels live in `kernels/`).

Every strategy has the same signature and computes, for each token n,

    delta[n] = sum_j  weights[n, j] * scaling[e] * (x[n] @ a[e]) @ b[e],   e = experts[n, j]

    x        [N, in]        activations (compute dtype)
    a        [E, in, r]     stacked LoRA A of all experts (zero-padded to the largest rank)
    b        [E, r, out]    stacked LoRA B
    scaling  [E]            alpha / r (or alpha / sqrt(r) with rsLoRA), float32
    experts  [N, k] int32   chosen experts per token
    weights  [N, k]         their routing weights (float32)
    returns  [N, out]       in x's dtype

| name     | how                                                        | cost                          |
| -------- | ---------------------------------------------------------- | ----------------------------- |
| `loop`   | every expert on every token, masked by its routing weight  | E x LoRA; the paper's loop    |
| `gather` | `a[experts]`, `b[experts]` per token, then two einsums      | the paper's bmm-torch path     |
| `dense`  | `x @ a_all [in, E*r]`, zero unselected, `@ b_all [E*r, out]` | cheap when E*r << in          |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def combine_weights(experts: jax.Array, weights: jax.Array, scaling: jax.Array, num_experts: int) -> jax.Array:
    """Per-token coefficient of every expert, `[N, E]` float32: sum of the token's weights on it x scaling."""
    onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [N, k, E]
    return jnp.einsum("nk,nke->ne", weights.astype(jnp.float32), onehot) * scaling.astype(jnp.float32)


def loop(x, a, b, scaling, experts, weights):
    num_experts = a.shape[0]
    coef = combine_weights(experts, weights, scaling, num_experts)
    out = jnp.zeros((x.shape[0], b.shape[-1]), jnp.float32)
    for e in range(num_experts):
        h = x @ a[e]  # [N, r]
        out = out + coef[:, e, None] * (h @ b[e]).astype(jnp.float32)
    return out.astype(x.dtype)


def gather(x, a, b, scaling, experts, weights):
    a_sel = a[experts]  # [N, k, in, r]
    b_sel = b[experts]  # [N, k, r, out]
    h = jnp.einsum("nd,nkdr->nkr", x, a_sel, preferred_element_type=jnp.float32)
    h = h * (weights.astype(jnp.float32) * scaling.astype(jnp.float32)[experts])[..., None]
    return jnp.einsum("nkr,nkro->no", h.astype(x.dtype), b_sel, preferred_element_type=jnp.float32).astype(x.dtype)


def dense(x, a, b, scaling, experts, weights):
    num_experts, d_in, r = a.shape
    coef = combine_weights(experts, weights, scaling, num_experts)  # [N, E]
    h = jnp.einsum("nd,edr->ner", x, a, preferred_element_type=jnp.float32)  # x @ a_all
    h = (h * coef[:, :, None]).astype(x.dtype)
    return jnp.einsum("ner,ero->no", h, b, preferred_element_type=jnp.float32).astype(x.dtype)


STRATEGIES = {"loop": loop, "gather": gather, "dense": dense}

try:  # the kernel strategies "fused" and "triton" (meteora_jax/fused.py; kernels/ needs jax's Pallas)
    from meteora_jax.fused import ROUTED, linear_fn
    from meteora_jax.fused import STRATEGIES as _KERNEL_STRATEGIES
except ImportError:  # pragma: no cover - a jax without Pallas: the pure-JAX strategies only
    _KERNEL_STRATEGIES, ROUTED = {}, {}
    linear_fn = lambda strategy, n_tokens: None  # noqa: E731
STRATEGIES.update(_KERNEL_STRATEGIES)
