"""Packed projections for fast decoding: fewer, larger matrix products per layer.

At decode sizes a MeteoRA layer is bound by kernel launches, not by bytes: every target linear runs a base
product, a gate product, the top-k, the shrink `x @ A`, the expand `h @ B` and an add, for seven linears a
layer. `pack_projections(model)` rebuilds, in place, the linears that read the same input as one packed
projection each (attention: q/k/v, then o; MLP: gate/up, then down) that computes

    logits  = x @ [G_1 | ... | G_m]                         fp32, every member's gate at once   [N, m, E]
    w, idx  = route(logits)                                  per member, as MeteoraLinear does
    h       = x @ [A_1 | ... | A_m]                          every expert's shrink at once       [N, m*E*r]
    h'      = h * (w scattered to its experts x alpha/r)     zero for unpicked experts
    [y_1 | ... | y_m] = [x | h'] @ [[W_1 ... W_m] ; blockdiag(B_1, ..., B_m)]

so the adapter term is folded into the base product (one GEMM over a K extended by m*E*r rows) and the
routing of all members is one top-k. The math is the `dense` strategy's; the result equals the unpacked
model up to float rounding (in bf16 about as far from fp32 as the unpacked model), and the routing is
identical (same fp32 gate logits). Routing options (`set_routing`) keep working.

Modes (`pack_projections(model, mode=...)`):
- `fold`: as above. The block-diagonal expand stores zeros: for q/k/v, (m - 1) / m of `m*E*r x out` is zero.
  With Llama-3-8B shapes, E = 28, r = 8, the packed adapters are 13% of the base weights' bytes (9% without
  the zeros): the price of one product instead of m.
- `split`: the same weights, the base product and the expand as two products.
- `routed`: the base product `x @ [W_1 | ... | W_m]`, then, for calls of at most
  `BlockSizes.routed_max_tokens` tokens (decoding), every member's gate, routing and adapter term in two Pallas
  launches that add into the base output in place (`kernels.meteora_pallas.meteora_routed_packed`), instead of
  two launches per member; longer calls (prefill) run the `dense` math. B is stored as `[E*r, sum(out)]`
  (member j's `[E, r, out_j]` in its own columns: no zeros when every member has experts).
- `extended`: one product `z = x @ [W_1 ... W_m | G hi | G lo | A_1 ... A_m | zero padding]` with an f32 result
  gives the base outputs, the gate logits (the f32 gate as two bf16 column blocks, hi + lo, whose products sum to
  it; one block in float32) and every shrink; for a few tokens one Pallas launch then routes every member and
  writes y = base + delta (`kernels.meteora_pallas.meteora_routed_expand`), so a group costs one XLA product and
  one launch; prefill runs the `dense` math on z's columns. The gate's and shrink's bytes are read by the
  product, like the base weight's. With `BlockSizes.routed_glu` (off by default: no gain measured on the H100),
  gate/up's launch also applies the MLP's activation and returns silu(gate) * up: one launch less per layer.
  With `BlockSizes.routed_z_low` (opt-in; `generate --low-precision-gate`) the decode product's z comes in the
  compute dtype (bf16), not f32: Llama-3-8B shapes decode at batch 1 on the H100 in 1.15x the packed base's
  step instead of 1.26x (experiments/results/decode_product), but the gate logits are rounded to bf16, so
  routing can differ from the unpacked model's at near-ties.
- `gemv`: `extended`'s matrix stored transposed, [ldz, in] (rows contiguous along the input, as nn.Linear stores
  its weight), so that for a few tokens one Pallas launch computes the product's columns as matrix-vector
  products, routes and adds the adapter term (`kernels.meteora_pallas.meteora_gemv_expand`): one launch per
  group, no XLA product. Prefill (and a group where some member has no experts) runs `extended`'s path with the
  transposed operand.
- `auto` (default): `extended` when the model's strategy is `fused` or JAX runs on a GPU (the fastest packed
  decoding measured there, experiments/results/generate_bench.md), else `fold` (on a CPU the Pallas kernels run
  in interpret mode, which is slow).
A base `Llama` packs too (concatenated kernels only), so benchmarks compare like with like.

Packing is for inference on one device (generation, evaluation): it replaces the original parameters (no
copy is kept), `checkpoint.save` refuses a packed model, and the sharding rules do not know its names.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.meteora_pallas import BlockSizes, meteora_gemv_expand, meteora_routed_expand, meteora_routed_packed
from meteora_jax.llama import Linear, Llama

MODES = ("fold", "split", "routed", "extended", "gemv")
EXTENDED_ALIGN = 128  # mode extended: the product's columns are padded to a multiple of this
GROUPS = (("self_attn", "packed_qkv", ("q_proj", "k_proj", "v_proj")), ("self_attn", "packed_o", ("o_proj",)),
          ("mlp", "packed_gate_up", ("gate_proj", "up_proj")), ("mlp", "packed_down", ("down_proj",)))


class PackedProjection(nnx.Module):
    """Linears `names` on one input as one product (see the module docstring). `__call__(x)` returns
    `(outputs, routings)`: one array per member, and `{name: Routing or None}`."""

    def __init__(self, members: dict[str, Linear], mode: str = "fold"):
        from meteora_jax.meteora import ExpertParam, ExpertScaling, GateParam, MeteoraLinear

        if mode not in MODES:
            raise ValueError(f"packing mode must be one of {MODES}, got {mode!r}")
        self.names = tuple(members)
        self.mode = mode
        lins = list(members.values())
        for name, lin in members.items():
            if type(lin) not in (Linear, MeteoraLinear):
                raise TypeError(f"cannot pack {name}: a {type(lin).__name__}, expected Linear or MeteoraLinear")
        d_in = {lin.kernel.shape[0] for lin in lins}
        if len(d_in) != 1:
            raise ValueError(f"cannot pack {self.names}: input sizes differ ({sorted(d_in)})")
        if len({lin.bias is None for lin in lins}) != 1:
            raise ValueError(f"cannot pack {self.names}: some have a bias and some not")
        self.dtype = lins[0].dtype
        self.d_in = lins[0].kernel.shape[0]
        self.sizes = tuple(int(lin.kernel.shape[1]) for lin in lins)
        experts = [i for i, lin in enumerate(lins) if isinstance(lin, MeteoraLinear)]
        self.expert_members = tuple(experts)  # positions of the members with experts
        w = jnp.concatenate([lin.kernel[...] for lin in lins], axis=1)
        self.bias = None if lins[0].bias is None else nnx.Param(jnp.concatenate([lin.bias[...] for lin in lins]))
        if not experts:
            self.kernel = nnx.Param(w)
            self.gate = self.lora_a = self.lora_b = self.scaling = None
            return
        first = lins[experts[0]]
        e, r = first.lora_a.shape[0], first.lora_a.shape[2]
        if any(lins[i].lora_a.shape[0] != e or lins[i].lora_a.shape[2] != r for i in experts):
            raise ValueError(f"cannot pack {self.names}: expert counts or ranks differ")
        self.num_experts, self.rank = e, r
        self.gate = GateParam(jnp.concatenate([lins[i].gate[...] for i in experts], axis=1))  # [in, m*E]
        self.lora_a = ExpertParam(jnp.concatenate(  # [in, m*E*r], expert-major within a member
            [jnp.transpose(lins[i].lora_a[...], (1, 0, 2)).reshape(self.d_in, e * r) for i in experts], axis=1))
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.spans = tuple((int(offsets[i]), int(self.sizes[i])) for i in experts)  # expert members' columns
        self.gate_parts = 0
        if mode in ("routed", "extended", "gemv"):  # every member's B side by side, [E*r, sum(out)]
            b_side = jnp.zeros((e * r, w.shape[1]), w.dtype)
            for i in experts:
                b_side = b_side.at[:, offsets[i]:offsets[i + 1]].set(lins[i].lora_b[...].reshape(e * r, -1)
                                                                     .astype(w.dtype))
            self.lora_b = ExpertParam(b_side)
            self.kernel = nnx.Param(w)
        if mode in ("extended", "gemv"):  # one product gives the base output, the gate logits and the shrink
            low = min((jnp.dtype(self.dtype), jnp.dtype(w.dtype)), key=lambda t: t.itemsize)  # storage or compute
            parts = gate_parts(self.gate[...].astype(jnp.float32), low)
            self.gate_parts = len(parts)
            cols = [w, *[g.astype(w.dtype) for g in parts], self.lora_a[...].astype(w.dtype)]
            pad = -sum(c.shape[1] for c in cols) % EXTENDED_ALIGN
            cols.append(jnp.zeros((self.d_in, pad), w.dtype))  # rows of whole 128-column blocks: a faster product
            z = jnp.concatenate(cols, axis=1)
            self.kernel = nnx.Param(z.T if mode == "gemv" else z)  # gemv: [ldz, in], rows contiguous in `in`
            self.gate = self.lora_a = None  # inside the kernel now
        elif mode != "routed":
            expand = jnp.zeros((len(experts) * e * r, w.shape[1]), w.dtype)  # blockdiag(B_1, ..., B_m)
            for j, i in enumerate(experts):
                b = lins[i].lora_b[...].reshape(e * r, -1).astype(w.dtype)
                expand = expand.at[j * e * r:(j + 1) * e * r, offsets[i]:offsets[i + 1]].set(b)
            self.kernel = nnx.Param(jnp.concatenate([w, expand], axis=0))  # [in + m*E*r, sum(out)]
            self.lora_b = None
        self.scaling = ExpertScaling(jnp.stack([lins[i].scaling[...] for i in experts]))  # [m, E]
        self.set_routing_from(first)

    def _record(self, routings, logits, experts, weights, lead) -> None:
        """Each expert member's Routing from the packed [N, m, ...] arrays."""
        from meteora_jax.meteora import Routing

        e, k = self.num_experts, experts.shape[-1]
        for j, i in enumerate(self.expert_members):
            routings[self.names[i]] = Routing(logits[:, j].reshape(*lead, e), experts[:, j].reshape(*lead, k),
                                              weights[:, j].reshape(*lead, k))

    def set_routing_from(self, lin) -> None:
        """Copy the routing options (top_k, temperature, routing, forced_expert, adapters_enabled)."""
        self.top_k, self.temperature, self.routing = lin.top_k, lin.temperature, lin.routing
        self.forced_expert, self.adapters_enabled = lin.forced_expert, lin.adapters_enabled

    def set_routing(self, config) -> None:
        if self.expert_members:
            self.set_routing_from(config)

    def __call__(self, x: jax.Array, forced: jax.Array | None = None,
                 glu: bool = False) -> tuple[list[jax.Array], dict[str, Any]]:
        """`forced`: per-token forced experts `x.shape[:-1]` (-1: the gate routes), as in `MeteoraLinear`; rows
        with it run the `dense` routing math (the decode kernels route by themselves). `glu` (two members of one
        size, a Llama MLP's gate/up): the outputs are `[silu(gate) * up]`, which mode `extended` computes inside
        its decode kernel when `BlockSizes.routed_glu` is set."""
        if glu and (len(self.sizes) != 2 or self.sizes[0] != self.sizes[1]):
            raise ValueError(f"glu takes two members of one size, got {self.names} of sizes {self.sizes}")
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.d_in).astype(self.dtype)
        n = xf.shape[0]
        forced = None if forced is None else forced.reshape(-1)
        routings: dict[str, Any] = {name: None for name in self.names}
        kernel = self.kernel[...].astype(self.dtype)
        if self.mode in ("extended", "gemv") and self.expert_members:
            y, activated = self._extended(xf, kernel, routings, lead, forced, glu=glu and self.bias is None)
            if activated:  # the decode kernel returned silu(gate) * up
                return [y.reshape(*lead, -1)], routings
        elif not self.expert_members or not self.adapters_enabled:
            y = xf @ kernel[:self.d_in]
        elif self.mode == "routed" and forced is None and n <= BlockSizes.get_default().routed_max_tokens:
            y, logits, experts, weights = meteora_routed_packed(
                xf, xf @ kernel, self.gate[...].astype(jnp.float32), self.lora_a[...].astype(self.dtype),
                self.lora_b[...].astype(self.dtype), self.scaling[...], self.spans, top_k=self.top_k,
                temperature=self.temperature, routing=self.routing, forced_expert=self.forced_expert)
            self._record(routings, logits, experts, weights, lead)
        else:
            m, e = len(self.expert_members), self.num_experts
            logits = (xf.astype(jnp.float32) @ self.gate[...].astype(jnp.float32)).reshape(n, m, e)
            p = jnp.dot(xf, self.lora_a[...].astype(self.dtype), preferred_element_type=jnp.float32)
            h, experts, weights = self._dense_routing(logits, p, forced)
            if self.mode == "fold":  # one product over [x | h']
                y = jnp.concatenate([xf, h], axis=-1) @ kernel
            elif self.mode == "split":  # the base product and the expand apart (no concatenated operand)
                y = xf @ kernel[:self.d_in] + h @ kernel[self.d_in:]
            else:  # routed, many tokens: each member's expand into its columns
                y = xf @ kernel + self._member_terms(h, self.lora_b[...].astype(self.dtype), self.dtype)
            self._record(routings, logits, experts, weights, lead)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        outs = [o.reshape(*lead, -1) for o in jnp.split(y, np.cumsum(self.sizes)[:-1], axis=-1)]
        return ([jax.nn.silu(outs[0]) * outs[1]] if glu else outs), routings

    def _dense_routing(self, logits, p, forced=None):
        """The `dense` math for many tokens: from logits [N, m, E] and the unscaled shrink P [N, m*E*r] (f32),
        each member's routing (or the forced expert; `forced [N]` per token, -1: routed) and h' = P * (weight x
        alpha/r of the picked experts, zero elsewhere) in the compute dtype. Returns (h', experts [N, m, k],
        weights [N, m, k])."""
        from meteora_jax.meteora import override_routing, route
        from meteora_jax.strategies import combine_weights

        n, m, e = logits.shape
        if self.forced_expert is None:
            weights, experts = route(logits, self.top_k, self.temperature, self.routing)  # [N, m, k]
        else:
            experts = jnp.full((n, m, 1), self.forced_expert, jnp.int32)
            weights = jnp.ones((n, m, 1), jnp.float32)
        if forced is not None:
            experts, weights = override_routing(experts, weights, forced)
        k = experts.shape[-1]
        coef = combine_weights(experts.reshape(n * m, k), weights.reshape(n * m, k), jnp.ones((e,)), e)
        coef = coef.reshape(n, m, e) * self.scaling[...].astype(jnp.float32)  # [N, m, E]
        h = (p.reshape(n, m, e, self.rank) * coef[..., None]).reshape(n, m * e * self.rank).astype(self.dtype)
        return h, experts, weights

    def _extended(self, xf, kernel, routings, lead, forced=None, glu=False) -> tuple[jax.Array, bool]:
        """Mode `extended`: z = x @ [W | G parts | A] (f32) in one product, then the routed expand (one Pallas
        launch; a few tokens) or the dense math on z's columns (prefill). Mode `gemv` (kernel stored transposed):
        for a few tokens, when every member has experts, product and expand are one launch
        (`meteora_gemv_expand`); otherwise as `extended`. Returns (y [N, ld], False), or with `glu` (mode
        extended, decode, both members with experts, `BlockSizes.routed_glu`) (silu(gate) * up [N, ld / 2], True)
        from the decode launch."""
        n, ld = xf.shape[0], sum(self.sizes)
        m, e, r = len(self.expert_members), self.num_experts, self.rank
        b_side = self.lora_b[...].astype(self.dtype)
        bs = BlockSizes.get_default()
        whole = len(self.spans) == len(self.sizes)
        if self.mode == "gemv":
            if (self.adapters_enabled and whole and forced is None
                    and n <= min(bs.routed_max_tokens, bs.gemv_max_tokens)):
                y, logits, experts, weights = meteora_gemv_expand(
                    xf, kernel, b_side, self.scaling[...], self.spans, gate_parts=self.gate_parts, top_k=self.top_k,
                    temperature=self.temperature, routing=self.routing, forced_expert=self.forced_expert,
                    out_dtype=self.dtype)
                self._record(routings, logits, experts, weights, lead)
                return y, False
            z = jax.lax.dot_general(xf, kernel, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        else:  # [N, ld + parts*m*E + m*E*r]; at decode sizes optionally in the compute dtype (`routed_z_low`)
            low = bs.routed_z_low and self.adapters_enabled and forced is None and n <= bs.routed_max_tokens
            z = jnp.dot(xf, kernel, preferred_element_type=self.dtype if low else jnp.float32)
        if not self.adapters_enabled:
            return z[:, :ld].astype(self.dtype), False
        if forced is None and n <= bs.routed_max_tokens:  # decode: one launch
            glu = glu and whole and bs.routed_glu
            y, logits, experts, weights = meteora_routed_expand(
                z, b_side, self.scaling[...], self.spans, gate_parts=self.gate_parts, top_k=self.top_k,
                temperature=self.temperature, routing=self.routing, forced_expert=self.forced_expert,
                y=None if whole else z[:, :ld].astype(self.dtype), out_dtype=self.dtype, glu=glu)
            self._record(routings, logits, experts, weights, lead)
            return y, glu
        g0 = ld + self.gate_parts * m * e
        logits = sum(z[:, ld + t * m * e:ld + (t + 1) * m * e] for t in range(self.gate_parts)).reshape(n, m, e)
        h, experts, weights = self._dense_routing(logits, z[:, g0:g0 + m * e * r], forced)
        y = z[:, :ld] + self._member_terms(h, b_side, jnp.float32)
        self._record(routings, logits, experts, weights, lead)
        return y.astype(self.dtype), False

    def _member_terms(self, h, b_side, dtype) -> jax.Array:
        """The members' adapter terms side by side, [N, sum(out)] in `dtype`: member j's columns of h' [N, m*E*r]
        times its columns of B (`b_side [E*r, sum(out)]`, modes routed / extended / gemv), zeros for members
        without experts. One concatenation, where adding each term into its columns of y is a scatter each."""
        er, n = self.num_experts * self.rank, h.shape[0]
        pieces, at = [], 0
        for j, (off, size) in enumerate(self.spans):  # in column order
            if off > at:
                pieces.append(jnp.zeros((n, off - at), dtype))
            pieces.append(jnp.dot(h[:, j * er:(j + 1) * er], b_side[:, off:off + size], preferred_element_type=dtype))
            at = off + size
        if at < sum(self.sizes):
            pieces.append(jnp.zeros((n, sum(self.sizes) - at), dtype))
        return jnp.concatenate(pieces, axis=1)


def gate_parts(gate: jax.Array, dtype) -> list[jax.Array]:
    """An f32 gate [in, G] as column blocks in `dtype` whose products with x sum to x @ gate: the gate itself in
    float32; else its rounding and the rounding of the rest (hi + lo: about 16 bits of the gate's 24)."""
    if jnp.dtype(dtype) == jnp.float32:
        return [gate.astype(jnp.float32)]
    hi = gate.astype(dtype)
    return [hi, (gate - hi.astype(jnp.float32)).astype(dtype)]


def packed_projections(model: Llama) -> list[PackedProjection]:
    return [p for layer in model.layers for part, attr, _ in GROUPS
            if (p := getattr(getattr(layer, part), attr, None)) is not None]


def is_packed(model: Llama) -> bool:
    """Whether `pack_projections` has packed this model."""
    return bool(packed_projections(model))


def pack_projections(model: Llama, mode: str = "auto") -> Llama:
    """Pack, in place, the target linears of every layer (see the module docstring); returns the model.
    The original linears are removed (their memory is freed once nothing else holds them). `mode`: `fold`,
    `split`, `routed`, `extended`, or `auto` (`extended` when the model's strategy is `fused` or on a GPU, else
    `fold`)."""
    if is_packed(model):
        raise ValueError("this model is already packed")
    if mode == "auto":
        mcfg = getattr(model, "meteora_config", None)
        fused = mcfg is not None and mcfg.strategy == "fused"
        mode = "extended" if fused or jax.default_backend() == "gpu" else "fold"
    if mode not in MODES:
        raise ValueError(f"packing mode must be auto or one of {MODES}, got {mode!r}")
    for layer in model.layers:
        for part, attr, names in GROUPS:
            parent = getattr(layer, part)
            setattr(parent, attr, nnx.data(PackedProjection({n: getattr(parent, n) for n in names}, mode)))
            for n in names:
                setattr(parent, n, None)
    return model
