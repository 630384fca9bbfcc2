"""The kernel strategies of the MeteoRA adapter term: `fused` (Pallas) and `triton` (jax-triton).

Same signature as `meteora_jax.strategies` (`fn(x [N, in], a [E, in, r], b [E, r, out], scaling [E],
experts [N, k], weights [N, k]) -> [N, out]`); `strategies.py` merges `STRATEGIES` below into its registry,
so `MeteoraConfig(strategy="fused")` picks it. `fused` runs anywhere (Pallas interpret mode without a GPU);
`triton` needs a GPU and jax-triton (`pip install 'meteora-jax[gpu]'`) and says so when called without them.
Both are differentiable (custom VJP): the gate trains through them, and so can the experts.

`ROUTED` maps a strategy to a function that runs a MeteoRA linear's gate, routing and adapter term together
for a few tokens (decode): `MeteoraLinear` calls it, with the base output, when N <= `max_tokens`. `linear_fn`
gives the function that computes base product and adapter term together for many tokens (prefill, training).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from kernels import meteora_pallas, meteora_triton


def fused(x, a, b, scaling, experts, weights):
    return meteora_pallas.meteora_fused(x, a, b, scaling, experts, weights)


def triton(x, a, b, scaling, experts, weights):
    return meteora_triton.meteora_triton(x, a, b, scaling, experts, weights)


STRATEGIES = {"fused": fused, "triton": triton}


@dataclasses.dataclass(frozen=True)
class Routed:
    """`fn(x, y, gate, a, b, scaling, *, top_k, temperature, routing, forced_expert) -> (y + delta, logits,
    experts, weights)`, used for N <= max_tokens tokens."""

    fn: Callable
    max_tokens: int


ROUTED = {"fused": Routed(meteora_pallas.meteora_routed, meteora_pallas.BlockSizes().routed_max_tokens)}


def linear_fn(strategy: str, n_tokens: int) -> Callable | None:
    """`fn(x, w, a, b, scaling, experts, weights) -> x @ w + delta` when `strategy` computes a whole MeteoRA linear
    (base product and expand in one reduction) for `n_tokens` tokens, else None (`MeteoraLinear` then adds the
    strategy's adapter term to its base product). `fused` does from `linear_min_tokens` to `linear_max_tokens`
    of `BlockSizes.get_default()`: off by default (on the H200 it beat `dense` at 4096 tokens and lost at 1024 and
    16384; not measured in the model yet); switch it on with `set_default_block_sizes`."""
    bs = meteora_pallas.BlockSizes.get_default()
    if strategy == "fused" and bs.linear_min_tokens <= n_tokens <= bs.linear_max_tokens:
        return meteora_pallas.meteora_linear
    return None
