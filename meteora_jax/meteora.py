"""The MeteoRA linear: a frozen base linear plus all LoRA adapters as experts behind a per-token top-k gate.

    y      = x @ W (+ bias)                                 frozen base weight W [in, out]
    logits = x @ G                                          gate G [in, E] (GateParam: what trains)
    w, idx = route(logits)                                  per token, k experts
    y     += sum_j w_j * s[idx_j] * (x @ A[idx_j]) @ B[idx_j]

`A [E, in, r]` and `B [E, r, out]` are `ExpertParam`s (frozen unless asked), `s [E]` an `ExpertScaling`
(alpha / r, or alpha / sqrt(r) with rsLoRA). Adapters of lower rank are zero-padded to `r` (exact).

Routing (`MeteoraConfig.routing`):
- `topk_softmax` (default; the reference's accelerated path): top-k of the raw logits, then softmax of
  those k values divided by the temperature T; with k = 1 the weight is 1.
- `softmax_topk` (the reference's plain path): softmax over all logits / T, top-k, renormalised to sum 1.
Modes: `forced_expert=i` routes every token to expert i with weight 1 (equals PEFT with adapter i);
`adapters_enabled=False` gives the base model exactly. Per row of a batch, `Llama.__call__(...,
forced_experts=[i, -1, ...])` forces row 0's tokens to expert i and leaves row 1 to the gate: a traced array, so
one compiled program serves any mix of adapters (`override_routing`).

The adapter term is computed by a strategy (`meteora_jax.strategies`: `loop`, `gather`, `dense`, and the
kernels `fused`, `triton`), all of one signature. With `fused`, a call of at most 16 tokens (decoding) runs
the gate product, the routing and the adapter term together in two kernels (`meteora_jax.fused.ROUTED`); an
opt-in path (`meteora_jax.fused.linear_fn`) runs the base product and the expand as one reduction for many tokens.
A call returns `(y, Routing(logits, experts, weights))`, so gate logits (for the training loss) and the
chosen experts (for the routing trace) leave jit as ordinary outputs.

Routing options are static attributes: change them with `set_routing(model, ...)` (recompiles once).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from meteora_jax.config import LlamaConfig
from meteora_jax.llama import TARGET_MODULES, Linear, Llama
from meteora_jax.strategies import ROUTED, STRATEGIES, linear_fn

ROUTINGS = ("topk_softmax", "softmax_topk")


class GateParam(nnx.Param):
    """A MeteoRA gate `[in, E]`: what gate training updates."""


class ExpertParam(nnx.Param):
    """Stacked LoRA experts (`A [E, in, r]`, `B [E, r, out]`); frozen unless experts are trained."""


class ExpertScaling(nnx.Variable):
    """Per-expert LoRA scaling `[E]` (alpha / r); never trained."""


class Routing(NamedTuple):
    logits: jax.Array  # [..., E] float32 gate logits
    experts: jax.Array  # [..., k] int32 chosen experts
    weights: jax.Array  # [..., k] float32 their weights


def strategy_names() -> tuple[str, ...]:
    """Names of the registered strategies (`meteora_jax.strategies.STRATEGIES`)."""
    return tuple(STRATEGIES)


@dataclasses.dataclass(frozen=True)
class MeteoraConfig:
    """Which modules carry experts, how many, their rank, and how tokens are routed.

    Structural fields (`expert_names`, `rank`, `target_modules`) fix the parameter shapes; the others are
    routing options that can change on a built model (`set_routing`).
    """

    expert_names: tuple[str, ...]
    rank: int
    target_modules: tuple[str, ...] = TARGET_MODULES
    top_k: int = 2
    temperature: float = 1.0
    routing: str = "topk_softmax"
    strategy: str = "dense"  # fastest of all strategies on the H100 (experiments/results/layer_bench.md)
    forced_expert: int | None = None
    adapters_enabled: bool = True

    STRUCTURAL = ("expert_names", "rank", "target_modules")

    def __post_init__(self):
        object.__setattr__(self, "expert_names", tuple(self.expert_names))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        e = len(self.expert_names)
        if e < 1 or len(set(self.expert_names)) != e:
            raise ValueError(f"expert_names must be non-empty and unique, got {self.expert_names}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        bad = [m for m in self.target_modules if m not in TARGET_MODULES]
        if bad or not self.target_modules:
            raise ValueError(f"target_modules {self.target_modules}: each must be one of {TARGET_MODULES}")
        if not 1 <= self.top_k <= e:
            raise ValueError(f"top_k must be in 1..{e} (the number of experts), got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.forced_expert is not None and not 0 <= self.forced_expert < e:
            raise ValueError(f"forced_expert must be in 0..{e - 1}, got {self.forced_expert}")

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeteoraConfig:
        return cls(**d)

    def replace(self, **kw) -> MeteoraConfig:
        return dataclasses.replace(self, **kw)


def route(logits: jax.Array, top_k: int, temperature: float, routing: str) -> tuple[jax.Array, jax.Array]:
    """Per-token `(weights [N, k] float32, experts [N, k] int32)` from gate logits `[N, E]`."""
    logits = logits.astype(jnp.float32)
    if routing == "topk_softmax":
        vals, idx = jax.lax.top_k(logits, top_k)
        w = jnp.ones_like(vals) if top_k == 1 else jax.nn.softmax(vals / temperature, axis=-1)
    elif routing == "softmax_topk":
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        w, idx = jax.lax.top_k(probs, top_k)
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return w, idx.astype(jnp.int32)


def override_routing(experts: jax.Array, weights: jax.Array, forced: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token forced experts over a routing: `experts`/`weights [N, ..., k]`, `forced [N]` int (-1: keep the
    token's routing). A forced token gets its expert in slot 0 with weight 1 and weight 0 in the other slots (their
    experts stay, so shapes and the trace keep k slots)."""
    f = forced.astype(jnp.int32).reshape(forced.shape + (1,) * (experts.ndim - 1))
    on = f >= 0
    first = jnp.arange(experts.shape[-1]) == 0
    experts = jnp.where(on & first, f, experts).astype(jnp.int32)
    weights = jnp.where(on, first.astype(jnp.float32), weights.astype(jnp.float32))
    return experts, weights


class MeteoraLinear(Linear):
    """A `Linear` (frozen base kernel `[in, out]`) plus MeteoRA experts and gate. See the module docstring."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: MeteoraConfig, dtype: str,
                 param_dtype: str, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
        e, r, pd = config.num_experts, config.rank, jnp.dtype(param_dtype)
        self.gate = GateParam(jax.random.normal(rngs.params(), (in_features, e), jnp.float32) / in_features ** 0.5)
        self.lora_a = ExpertParam(jax.random.normal(rngs.params(), (e, in_features, r), pd) / in_features ** 0.5)
        self.lora_b = ExpertParam(jax.random.normal(rngs.params(), (e, r, out_features), pd) / r ** 0.5)
        self.scaling = ExpertScaling(jnp.ones((e,), jnp.float32))
        self.set_routing(config)

    def set_routing(self, config: MeteoraConfig) -> None:
        if config.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {strategy_names()}, got {config.strategy!r}")
        self.top_k, self.temperature, self.routing = config.top_k, config.temperature, config.routing
        self.strategy, self.forced_expert = config.strategy, config.forced_expert
        self.adapters_enabled = config.adapters_enabled

    def __call__(self, x: jax.Array, forced: jax.Array | None = None) -> tuple[jax.Array, Routing | None]:
        """`x [..., in]`; `forced` (optional) per-token forced experts of shape `x.shape[:-1]` (-1: the gate
        routes that token; see `override_routing`)."""
        if not self.adapters_enabled:
            return self.base(x), None
        lead, d_in = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, d_in).astype(self.dtype)
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        routed = ROUTED.get(self.strategy)
        if routed is not None and forced is None and xf.shape[0] <= routed.max_tokens:  # decode: two launches
            y = self.base(x)
            y2, logits, experts, weights = routed.fn(
                xf, y.reshape(xf.shape[0], -1), self.gate[...].astype(jnp.float32), a, b, self.scaling[...],
                top_k=self.top_k, temperature=self.temperature, routing=self.routing,
                forced_expert=self.forced_expert)
            k = experts.shape[-1]
            return y2.reshape(y.shape), Routing(logits.reshape(*lead, -1), experts.reshape(*lead, k),
                                                weights.reshape(*lead, k))
        logits = xf.astype(jnp.float32) @ self.gate[...].astype(jnp.float32)  # [N, E]
        if self.forced_expert is None:
            weights, experts = route(logits, self.top_k, self.temperature, self.routing)
        else:
            experts = jnp.full((xf.shape[0], 1), self.forced_expert, jnp.int32)
            weights = jnp.ones((xf.shape[0], 1), jnp.float32)
        if forced is not None:
            experts, weights = override_routing(experts, weights, forced.reshape(-1))
        linear = linear_fn(self.strategy, xf.shape[0])
        if linear is not None:  # base product and adapter term together
            y = linear(xf, self.kernel[...].astype(self.dtype), a, b, self.scaling[...], experts, weights)
            y = y.reshape(*lead, -1)
            if self.bias is not None:
                y = y + self.bias[...].astype(self.dtype)
        else:
            delta = STRATEGIES[self.strategy](xf, a, b, self.scaling[...], experts, weights)
            y = self.base(x)
            y = y + delta.reshape(*lead, -1).astype(y.dtype)
        k = experts.shape[-1]
        return y, Routing(logits.reshape(*lead, -1), experts.reshape(*lead, k), weights.reshape(*lead, k))


def meteora_factory(mcfg: MeteoraConfig):
    """A `LinearFactory` that builds `MeteoraLinear` for `mcfg.target_modules` and plain `Linear` otherwise."""

    def factory(in_features, out_features, *, use_bias, name, layer, config: LlamaConfig, rngs):
        if name in mcfg.target_modules:
            return MeteoraLinear(in_features, out_features, use_bias=use_bias, config=mcfg, dtype=config.dtype,
                                 param_dtype=config.param_dtype, rngs=rngs)
        return Linear(in_features, out_features, use_bias=use_bias, dtype=config.dtype,
                      param_dtype=config.param_dtype, rngs=rngs)

    return factory


def meteora_linears(model: Llama):
    """`[(layer, module name, MeteoraLinear)]` of a model, in layer then `TARGET_MODULES` order."""
    out = []
    for i, layer in enumerate(model.layers):
        for name in TARGET_MODULES:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            mod = getattr(parent, name)
            if isinstance(mod, MeteoraLinear):
                out.append((i, name, mod))
    return out


class MeteoraLlama(Llama):
    """A Llama whose target linears are `MeteoraLinear`s. `meteora_config` and `expert_sources` (the adapters'
    original configs, JSON) are stored in checkpoints beside the Llama config."""

    def __init__(self, config: LlamaConfig, meteora_config: MeteoraConfig, *, rngs: nnx.Rngs,
                 expert_sources: tuple[str, ...] = ()):
        super().__init__(config, rngs=rngs, linear_factory=meteora_factory(meteora_config))
        self.meteora_config = meteora_config
        self.expert_sources = tuple(expert_sources)  # JSON strings, hashable

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"meteora": self.meteora_config.to_dict(),
                "expert_sources": [json.loads(s) for s in self.expert_sources]}


def set_routing(model: MeteoraLlama, **changes) -> MeteoraLlama:
    """Change routing options in place (`top_k`, `temperature`, `routing`, `strategy`, `forced_expert`,
    `adapters_enabled`); returns the model. Structural fields cannot change this way."""
    structural = set(changes) & set(MeteoraConfig.STRUCTURAL)
    if structural:
        raise ValueError(f"{sorted(structural)} fix parameter shapes; build a new model to change them")
    model.meteora_config = model.meteora_config.replace(**changes)
    for _, _, lin in meteora_linears(model):
        lin.set_routing(model.meteora_config)
    from meteora_jax.packed import packed_projections

    for group in packed_projections(model):
        group.set_routing(model.meteora_config)
    return model


def model_from_metadata(config: LlamaConfig, meta: dict[str, Any]) -> MeteoraLlama:
    mcfg = MeteoraConfig.from_dict(meta["meteora"])
    sources = tuple(json.dumps(s, sort_keys=True) for s in meta.get("expert_sources", []))
    return MeteoraLlama(config, mcfg, rngs=nnx.Rngs(0), expert_sources=sources)


class ExpertWeights(NamedTuple):
    """One linear's stacked experts, as converters produce them (numpy or jax arrays)."""

    a: Any  # [E, in, r]
    b: Any  # [E, r, out]
    scaling: Any  # [E] float32


def attach_experts(base: Llama, meteora_config: MeteoraConfig, experts: dict[tuple[int, str], ExpertWeights], *,
                   gates: dict[tuple[int, str], Any] | None = None, seed: int = 0,
                   expert_sources: tuple[str, ...] = ()) -> MeteoraLlama:
    """A `MeteoraLlama` with `base`'s weights (shared, not copied), the given experts and gates.

    `experts[(layer, module)]` must exist for every target linear; `gates` (same keys, `[in, E]`) default to
    a seeded random initialisation.
    """
    config = base.config
    abstract = nnx.eval_shape(lambda: MeteoraLlama(config, meteora_config, rngs=nnx.Rngs(seed),
                                                   expert_sources=expert_sources))
    graphdef, _ = nnx.split(abstract)
    base_flat = dict(nnx.to_flat_state(nnx.state(base)))
    out = []
    gate_key = jax.random.key(seed)
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        leaf = path[-1]
        if leaf in ("gate", "lora_a", "lora_b", "scaling"):
            layer, module = int(path[1]), path[-2]
            if leaf == "gate":
                if gates is not None and (layer, module) in gates:
                    value = jnp.asarray(gates[(layer, module)], jnp.float32)
                else:
                    gate_key, sub = jax.random.split(gate_key)
                    value = jax.random.normal(sub, var.shape, jnp.float32) / var.shape[0] ** 0.5
            else:
                if (layer, module) not in experts:
                    raise KeyError(f"no experts given for layer {layer} {module}")
                w = experts[(layer, module)]
                value = jnp.asarray({"lora_a": w.a, "lora_b": w.b, "scaling": w.scaling}[leaf], var.dtype)
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"layer {layer} {module} {leaf}: shape {tuple(value.shape)}, "
                                 f"expected {tuple(var.shape)}")
        else:
            value = base_flat[path].get_value()
        new = var.replace(value) if hasattr(var, "replace") else var
        out.append((path, new))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def base_model(model: MeteoraLlama) -> Llama:
    """The plain Llama inside a MeteoRA model (weights shared)."""
    base_state = {p: v for p, v in nnx.to_flat_state(nnx.state(model))
                  if p[-1] not in ("gate", "lora_a", "lora_b", "scaling")}
    abstract = nnx.eval_shape(lambda: Llama(model.config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.from_flat_state(list(base_state.items())))
