"""The fused MeteoRA kernels (Pallas `fused`, Triton `triton`) against the pure-JAX reference, forward and grad.

Laid out like jax's `tests/pallas/gpu_ops_test.py`: `TestKernelsGpu` (INTERPRET = False, marker `gpu`) runs
on the device machine with many shapes; `TestKernelsInterpret` runs the Pallas kernels in interpret mode on
the CPU with a few small shapes. Every case draws fresh random inputs; the reference gathers each token's
experts in float32. Tolerance: max |ours - ref| <= tol * max |ref| (bf16 1e-2, fp32 1e-5).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels import meteora_pallas as mp
from kernels import meteora_triton as mt

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    n: int  # tokens
    d: int  # in
    o: int  # out
    e: int  # experts
    r: int  # rank
    k: int  # top-k
    dtype: str = "float32"
    routing: str = "random"  # "random" | "unused" (2 experts never picked) | "one" (every token the same experts)
    decode: int = 1  # BlockSizes.decode_max_tokens
    kernel: str = "matvec"  # BlockSizes.decode_kernel, or "one": "split" in one launch (routed_one_launch)

    def __str__(self):
        return (f"n{self.n}-d{self.d}-o{self.o}-e{self.e}-r{self.r}-k{self.k}-{self.dtype}-{self.routing}"
                f"-dec{self.decode}{'' if self.kernel == 'matvec' else '-' + self.kernel}")


def make_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(case.dtype)
    x = jnp.asarray(rng.standard_normal((case.n, case.d)), dt)
    a = jnp.asarray(rng.standard_normal((case.e, case.d, case.r)) / case.d ** 0.5, dt)
    b = jnp.asarray(rng.standard_normal((case.e, case.r, case.o)) / case.r ** 0.5, dt)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, case.e), jnp.float32)
    pool = np.arange(case.e)
    if case.routing == "unused":
        pool = rng.permutation(case.e)[: case.e - 2]
    if case.routing == "one":
        pick = rng.choice(case.e, case.k, replace=False)
        experts = np.tile(pick, (case.n, 1))
    else:
        experts = np.stack([rng.choice(pool, case.k, replace=False) for _ in range(case.n)])
    weights = rng.dirichlet(np.ones(case.k), case.n) if case.k > 1 else np.ones((case.n, 1))
    cot = jnp.asarray(rng.standard_normal((case.n, case.o)), dt)
    return (x, a, b, scaling, jnp.asarray(experts, jnp.int32), jnp.asarray(weights, jnp.float32)), cot


def assert_close(ours, ref, tol, what, slack=0.0):
    """max |ours - ref| <= tol * max |ref|, after an elementwise allowance `slack` (an error the result's own
    rounding or its inputs' error permits) is taken off each element's error."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    err, scale = np.max(np.abs(ours - ref) - slack), np.abs(ref).max()
    assert scale > 0, f"{what}: reference is all zeros (the test would prove nothing)"
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} (beyond its slack) > {tol} * {scale:.3g}"


def rounding_slack(total, dtype, both=False):
    """What rounding `total` (f32) once to `dtype` may move it by: half an ulp, eps / 2 * |total|; a whole ulp
    when the reference was rounded too (`both`: the two may land on neighbouring values). For a delta read back
    as out - y, where out = y + delta rounded once: out's rounding scales with |y + delta|, not with the delta
    (a bf16 output of a base around 4 carries errors near 0.016 whatever the delta's size)."""
    return float(jnp.finfo(dtype).eps) / (1 if both else 2) * np.abs(np.asarray(total, np.float32))


def weights_slack(logits, temperature):
    """Routing weights are a softmax of logits / temperature, whose derivative is below 2 / temperature: the 1e-5
    relative error the logits are allowed becomes up to 2e-5 * max |logits| / temperature in the weights."""
    return 2e-5 * float(np.abs(np.asarray(logits, np.float32)).max()) / temperature


class KernelsBase:
    """The checks; subclasses say where they run and on which shapes."""

    INTERPRET = False
    CASES: tuple[Case, ...] = ()
    IMPLS = ("fused",)

    def impl(self, name, case):
        kernel = "split" if case.kernel == "one" else case.kernel
        bs = mp.BlockSizes(decode_max_tokens=case.decode, decode_kernel=kernel, routed_one_launch=case.kernel == "one")
        if name == "fused":
            return lambda *args: mp.meteora_fused(*args, block_sizes=bs, interpret=self.INTERPRET)
        if not mt.available():
            pytest.skip("the triton strategy needs triton, jax_triton and a GPU")
        return lambda *args: mt.meteora_triton(*args, block_sizes=bs)

    def check(self, name, case, seed=0):
        fn = self.impl(name, case)
        args, cot = make_inputs(case, seed)
        tol = TOL[case.dtype]
        out = fn(*args)
        assert out.shape == (case.n, case.o) and out.dtype == args[0].dtype
        assert_close(out, mp.meteora_reference(*args), tol, f"{name} forward")

        def loss(f):
            def inner(x, a, b, scaling, weights):
                y = f(x, a, b, scaling, args[4], weights)
                return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))
            return inner

        diff = (args[0], args[1], args[2], args[3], args[5])
        ours = jax.grad(loss(fn), argnums=(0, 1, 2, 3, 4))(*diff)
        ref = jax.grad(loss(mp.meteora_reference), argnums=(0, 1, 2, 3, 4))(*diff)
        for what, g, gr, arg in zip(("dx", "da", "db", "dscaling", "dweights"), ours, ref, diff, strict=True):
            assert g.shape == arg.shape, what
            assert_close(g, gr, tol, f"{name} {what}")

    def test_forward_and_grad(self, impl_name, case):
        self.check(impl_name, case)


def pytest_generate_tests(metafunc):
    cls = metafunc.cls
    if cls is not None and "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cls.CASES, ids=str)
    if cls is not None and "impl_name" in metafunc.fixturenames:
        metafunc.parametrize("impl_name", cls.IMPLS)


@pytest.mark.gpu
class TestKernelsGpu(KernelsBase):
    INTERPRET = False
    IMPLS = ("fused", "triton")
    CASES = (
        Case(1, 4096, 4096, 28, 8, 2, "bfloat16"),  # decode kernel, the benchmark's layer
        Case(5, 2048, 512, 28, 8, 2, "bfloat16", decode=0),  # two launches: skipped column tiles, split D
        Case(3, 512, 768, 28, 8, 2, "bfloat16", decode=4),  # decode kernel, several tokens
        Case(2, 256, 200, 9, 6, 2, "float32", decode=2),
        Case(16, 4096, 4096, 28, 8, 2, "bfloat16"),
        Case(64, 4096, 1024, 28, 8, 2, "bfloat16"),
        Case(1000, 4096, 4096, 28, 8, 2, "bfloat16"),
        Case(777, 1024, 2048, 8, 16, 1, "float32"),
        Case(513, 512, 768, 64, 64, 2, "bfloat16"),
        Case(300, 768, 520, 10, 12, 2, "bfloat16", "unused"),
        Case(200, 256, 384, 6, 5, 1, "float32", "one"),
        Case(129, 384, 256, 7, 8, 2, "bfloat16", "one"),
        Case(19, 64, 48, 5, 6, 2, "float32"),
        Case(1, 4096, 4096, 28, 8, 2, "bfloat16", kernel="split"),  # the routed pair with given routing
        Case(16, 4096, 1024, 28, 8, 2, "bfloat16", decode=16, kernel="split"),
        Case(5, 14336, 4096, 28, 8, 2, "bfloat16", "unused", decode=8, kernel="split"),
        Case(3, 200, 130, 7, 6, 3, "float32", decode=4, kernel="split"),
        Case(1, 4096, 4096, 28, 8, 2, "bfloat16", kernel="one"),
        Case(5, 14336, 4096, 28, 8, 2, "bfloat16", "unused", decode=8, kernel="one"),
    )

    @pytest.fixture(autouse=True)
    def _need_gpu(self):
        if jax.default_backend() != "gpu":
            pytest.skip("needs a GPU (run on the device machine)")


class TestKernelsInterpret(KernelsBase):
    INTERPRET = True
    CASES = (
        Case(1, 64, 48, 5, 8, 2),  # decode kernel (the grad goes through the two-launch path)
        Case(3, 512, 48, 28, 8, 2, decode=0),  # unpicked column tiles skipped; D split with atomic adds
        Case(19, 64, 48, 5, 6, 2),  # N not a multiple of the block, r not a power of two
        Case(37, 96, 80, 7, 8, 1, "bfloat16", "unused"),
        Case(21, 64, 40, 6, 5, 1, "float32", "one"),
        Case(3, 200, 130, 7, 6, 3, "float32", decode=4, kernel="split"),  # the routed pair with given routing
        Case(16, 96, 40, 28, 8, 2, "bfloat16", "unused", decode=16, kernel="split"),
        Case(3, 200, 130, 7, 6, 3, "float32", decode=4, kernel="one"),  # the pair in one launch
    )


def test_bad_shapes_are_refused():
    (x, a, b, s, e, w), _ = make_inputs(Case(4, 32, 16, 3, 4, 2), 0)
    with pytest.raises(ValueError, match=r"inconsistent shapes"):
        mp.meteora_fused(x[:, :8], a, b, s, e, w, interpret=True)
    with pytest.raises(ValueError, match=r"experts .* weights .* must both be \[N=4, k\]"):
        mp.meteora_fused(x, a, b, s, e[:, :1], w, interpret=True)


def test_triton_without_gpu_says_what_is_missing():
    if mt.available():
        pytest.skip("triton is usable here")
    (x, a, b, s, e, w), _ = make_inputs(Case(4, 32, 16, 3, 4, 2), 0)
    with pytest.raises(RuntimeError, match=r"strategy 'triton' needs"):
        mt.meteora_triton(x, a, b, s, e, w)


def test_model_strategy_fused_equals_gather():
    """`MeteoraConfig(strategy="fused")` in a MeteoRA Llama gives the logits of the `gather` strategy."""
    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, set_routing

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    mcfg = MeteoraConfig(expert_names=("a", "b", "c"), rank=4, target_modules=("q_proj", "down_proj"))
    model = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 7)))
    ref = model(tokens).logits
    set_routing(model, strategy="fused")
    out = model(tokens).logits
    assert_close(out, ref, 1e-4, "logits")


# ------------------------------------------------------------------ routed decode: gate + adapter, y in place
@dataclasses.dataclass(frozen=True)
class RCase:
    n: int
    d: int
    o: int
    e: int
    r: int
    k: int
    dtype: str = "float32"
    routing: str = "topk_softmax"
    temperature: float = 1.0
    forced: int | None = None

    def __str__(self):
        return (f"n{self.n}-d{self.d}-o{self.o}-e{self.e}-r{self.r}-k{self.k}-{self.dtype}-{self.routing}"
                f"-t{self.temperature}" + ("" if self.forced is None else f"-forced{self.forced}"))


ROUTED_CPU = (
    RCase(1, 64, 48, 5, 8, 2),
    RCase(3, 200, 130, 7, 6, 3, routing="softmax_topk", temperature=0.7),  # ragged D and out, r not a power of 2
    RCase(16, 96, 40, 28, 8, 2, "bfloat16"),
    RCase(5, 96, 40, 6, 5, 1),
    RCase(2, 64, 48, 5, 8, 1, forced=3),
)
ROUTED_GPU = (
    RCase(1, 4096, 4096, 28, 8, 2, "bfloat16"),
    RCase(16, 4096, 14336, 28, 8, 2, "bfloat16"),
    RCase(1, 14336, 4096, 28, 8, 2, "bfloat16", temperature=0.5),
    RCase(7, 576, 1536, 10, 8, 2, "bfloat16", "softmax_topk", 0.5),
    RCase(3, 200, 130, 7, 6, 3),
    RCase(16, 64, 1024, 28, 8, 1),
    RCase(4, 576, 192, 10, 8, 1, "bfloat16", forced=7),
)


def routed_inputs(c: RCase, seed: int):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(c.dtype)
    x = jnp.asarray(rng.standard_normal((c.n, c.d)), dt)
    y = jnp.asarray(rng.standard_normal((c.n, c.o)), dt)
    gate = jnp.asarray(rng.standard_normal((c.d, c.e)) / c.d ** 0.5, jnp.float32)
    a = jnp.asarray(rng.standard_normal((c.e, c.d, c.r)) / c.d ** 0.5, dt)
    b = jnp.asarray(rng.standard_normal((c.e, c.r, c.o)) / c.r ** 0.5, dt)
    s = jnp.asarray(rng.uniform(0.5, 2.0, c.e), jnp.float32)
    return x, y, gate, a, b, s


def check_routed(c: RCase, interpret: bool, seed: int = 0):
    """Kernels against `meteora.route` + the gathering float32 reference: experts equal, logits, weights, y + delta
    close; gradients of a loss on all three outputs against those of the pure-JAX composition."""
    from meteora_jax.meteora import route

    args = routed_inputs(c, seed)
    x, y, gate, a, b, s = args
    kw = dict(top_k=c.k, temperature=c.temperature, routing=c.routing, forced_expert=c.forced)
    fn = lambda *p: mp.meteora_routed(*p, **kw, interpret=interpret)
    out, logits, experts, weights = fn(*args)
    k = 1 if c.forced is not None else c.k
    assert out.shape == (c.n, c.o) and out.dtype == y.dtype
    assert logits.shape == (c.n, c.e) and experts.shape == weights.shape == (c.n, k)

    def ref(x, y, gate, a, b, s):
        lg = jnp.dot(x.astype(jnp.float32), gate, precision=jax.lax.Precision.HIGHEST)
        if c.forced is None:
            w, ex = route(lg, c.k, c.temperature, c.routing)
        else:
            ex, w = jnp.full((c.n, 1), c.forced, jnp.int32), jnp.ones((c.n, 1), jnp.float32)
        delta = mp.meteora_reference(x, a, b, s, ex, w).astype(jnp.float32)
        return (y.astype(jnp.float32) + delta).astype(y.dtype), lg, ex, w

    r_out, r_logits, r_experts, r_weights = ref(*args)
    np.testing.assert_array_equal(np.asarray(experts), np.asarray(r_experts), err_msg="experts")
    assert_close(logits, r_logits, 1e-5, "logits")
    assert_close(weights, r_weights, 1e-5, "weights", slack=weights_slack(r_logits, c.temperature))
    assert_close(out - y, r_out - y, TOL[c.dtype], "delta",  # the added term, at its own scale
                 slack=rounding_slack(r_out, out.dtype, both=True))

    cot = [jnp.asarray(np.random.default_rng(seed + 1).standard_normal(t.shape), jnp.float32)
           for t in (out, logits, weights)]

    def loss(f):
        def inner(*p):
            o_, lg, _, w = f(*p)
            return sum(jnp.sum(t.astype(jnp.float32) * u) for t, u in zip((o_, lg, w), cot, strict=True))
        return inner

    ours = jax.grad(loss(fn), argnums=range(6))(*args)
    theirs = jax.grad(loss(ref), argnums=range(6))(*args)
    for what, g, gr in zip(("dx", "dy", "dgate", "da", "db", "dscaling"), ours, theirs, strict=True):
        assert_close(g, gr, TOL[c.dtype], f"routed {what}")


@pytest.mark.parametrize("case", ROUTED_CPU, ids=str)
def test_routed_interpret(case):
    check_routed(case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ROUTED_GPU, ids=str)
def test_routed_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    check_routed(case, interpret=False)


@pytest.mark.parametrize("case", ROUTED_GPU, ids=str)
def test_routed_lowers_to_triton(case):
    """The routed pair's GPU cases, forward and backward, lower through Pallas' Triton backend on any machine."""
    x, y, gate, a, b, s = (jax.ShapeDtypeStruct(t.shape, t.dtype) for t in routed_inputs(case, 0))
    kw = dict(top_k=case.k, temperature=case.temperature, routing=case.routing, forced_expert=case.forced)
    fwd = lambda *p: mp.meteora_routed(*p, **kw, interpret=False)
    loss = lambda *p: sum(jnp.sum(t.astype(jnp.float32)) for t in (fwd(*p)[0], fwd(*p)[1], fwd(*p)[3]))
    for f in (fwd, jax.grad(loss, argnums=(0, 2))):
        text = jax.jit(f).trace(x, y, gate, a, b, s).lower(lowering_platforms=("cuda",)).as_text()
        assert "meteora_routed_shrink" in text and "meteora_routed_expand" in text


def test_routed_bad_args_are_refused():
    x, y, gate, a, b, s = routed_inputs(RCase(2, 32, 16, 3, 4, 2), 0)
    with pytest.raises(ValueError, match=r"gate \(16, 3\) must be \[in=32, E=3\]"):
        mp.meteora_routed(x, y, gate[:16], a, b, s, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"top_k must be in 1..3"):
        mp.meteora_routed(x, y, gate, a, b, s, top_k=4, interpret=True)
    with pytest.raises(ValueError, match=r"routing must be"):
        mp.meteora_routed(x, y, gate, a, b, s, top_k=2, routing="nope", interpret=True)


# ------------------------------------------- routed decode for packed members (meteora_jax.packed, "routed")
@dataclasses.dataclass(frozen=True)
class PCase:
    n: int
    d: int
    spans: tuple  # (offset, size) of each member in y's ld columns
    ld: int
    e: int
    r: int
    k: int
    dtype: str = "float32"
    routing: str = "topk_softmax"
    temperature: float = 1.0
    forced: int | None = None

    def __str__(self):
        spans = "_".join(f"{o}+{s}" for o, s in self.spans)
        return (f"n{self.n}-d{self.d}-{spans}-ld{self.ld}-e{self.e}-r{self.r}-k{self.k}-{self.dtype}-{self.routing}"
                f"-t{self.temperature}" + ("" if self.forced is None else f"-forced{self.forced}"))


PACKED_CPU = (
    PCase(1, 64, ((0, 48), (48, 16), (64, 16)), 80, 5, 8, 2),
    PCase(3, 200, ((0, 30), (50, 33)), 100, 7, 6, 3, routing="softmax_topk", temperature=0.7),  # gaps, ragged
    PCase(16, 96, ((0, 40), (40, 40)), 80, 28, 8, 2, "bfloat16"),
    PCase(2, 64, ((0, 48), (48, 16), (64, 16)), 80, 5, 8, 1, forced=3),
)
PACKED_GPU = (
    PCase(1, 4096, ((0, 4096), (4096, 1024), (5120, 1024)), 6144, 28, 8, 2, "bfloat16"),  # Llama-3-8B q/k/v
    PCase(16, 4096, ((0, 14336), (14336, 14336)), 28672, 28, 8, 2, "bfloat16", temperature=0.5),  # gate/up
    PCase(1, 14336, ((0, 4096),), 4096, 28, 8, 2, "bfloat16"),  # down
    PCase(3, 576, ((0, 576), (576, 192), (768, 192)), 960, 10, 8, 2, "bfloat16", "softmax_topk", 0.5),  # SmolLM2
    PCase(3, 200, ((0, 30), (50, 33)), 100, 7, 6, 3),
    PCase(5, 64, ((0, 48), (48, 16), (64, 16)), 80, 5, 8, 1, forced=3),
)


def packed_inputs(c: PCase, seed: int, abstract: bool = False):
    """Random inputs of a case (`abstract`: their shapes and dtypes only)."""
    dt, m = jnp.dtype(c.dtype), len(c.spans)
    if abstract:
        shapes = ((c.n, c.d, dt), (c.n, c.ld, dt), (c.d, m * c.e, jnp.float32), (c.d, m * c.e * c.r, dt),
                  (c.e * c.r, c.ld, dt), (m, c.e, jnp.float32))
        return tuple(jax.ShapeDtypeStruct(sh[:-1], sh[-1]) for sh in shapes)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((c.n, c.d)), dt)
    y = jnp.asarray(rng.standard_normal((c.n, c.ld)), dt)
    gate = jnp.asarray(rng.standard_normal((c.d, m * c.e)) / c.d ** 0.5, jnp.float32)
    a = jnp.asarray(rng.standard_normal((c.d, m * c.e * c.r)) / c.d ** 0.5, dt)
    b = jnp.asarray(rng.standard_normal((c.e * c.r, c.ld)) / c.r ** 0.5, dt)
    s = jnp.asarray(rng.uniform(0.5, 2.0, (m, c.e)), jnp.float32)
    return x, y, gate, a, b, s


def gate_parts(gate, dtype):
    """An f32 gate as column blocks of `dtype` whose products sum to its product: [gate] in float32, else the
    rounded gate and the rounded remainder (hi + lo)."""
    if jnp.dtype(dtype) == jnp.float32:
        return [gate]
    hi = gate.astype(dtype)
    return [hi, (gate - hi.astype(jnp.float32)).astype(dtype)]


def routed_expand_z(c: PCase, x, gate, a, seed: int):
    """z = x @ [W | gate parts | A] in float32 for `meteora_routed_expand`, with a random base weight W, and 13
    columns of padding (large values, which must be ignored)."""
    rng = np.random.default_rng(seed + 7)
    w = jnp.asarray(rng.standard_normal((c.d, c.ld)) / c.d ** 0.5, x.dtype)
    parts = gate_parts(gate, x.dtype)
    z = jnp.dot(x, jnp.concatenate([w, *parts, a], axis=1), preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([z, jnp.asarray(1e3 * rng.standard_normal((c.n, 13)), jnp.float32)], axis=1), len(parts)


def gemv_zt(c: PCase, x, gate, a, seed: int):
    """[W | gate parts | A]^T with the W of `routed_expand_z`, and 13 rows of padding (large values, never read)."""
    rng = np.random.default_rng(seed + 7)
    w = jnp.asarray(rng.standard_normal((c.d, c.ld)) / c.d ** 0.5, x.dtype)
    zt = jnp.concatenate([w, *gate_parts(gate, x.dtype), a], axis=1).T
    return jnp.concatenate([zt, jnp.asarray(1e3 * rng.standard_normal((13, c.d)), x.dtype)])


def member_routing(c: PCase, x, gate, j: int):
    """Member j's reference routing: (logits f32 [N, E], weights, experts) by `meteora.route`, or the forced
    expert with weight 1."""
    from meteora_jax.meteora import route

    e = c.e
    lg = jnp.dot(x.astype(jnp.float32), gate[:, j * e:(j + 1) * e], precision=jax.lax.Precision.HIGHEST)
    if c.forced is None:
        w, ex = route(lg, c.k, c.temperature, c.routing)
    else:
        ex, w = jnp.full((c.n, 1), c.forced, jnp.int32), jnp.ones((c.n, 1), jnp.float32)
    return lg, w, ex


def check_routed_packed(c: PCase, interpret: bool, seed: int = 0, block_sizes=None, via: str = "pair"):
    """The packed pair (`via` "pair"), or the expand alone from z = x @ [W | G | A] ("z"; with y when the spans
    leave columns out), against, per member, `meteora.route` and the gathering float32 reference on that member's
    slices: experts equal; logits, weights and y + delta close; columns outside every span unchanged."""

    x, y, gate, a, b, s = packed_inputs(c, seed)
    kw = dict(top_k=c.k, temperature=c.temperature, routing=c.routing, forced_expert=c.forced,
              block_sizes=block_sizes, interpret=interpret)
    if via == "pair":
        out, logits, experts, weights = mp.meteora_routed_packed(x, y, gate, a, b, s, c.spans, **kw)
    elif via == "gemv":  # one launch from zt = [W | G parts | A | padding]^T; the base is x @ W (f32)
        z, parts = routed_expand_z(c, x, gate, a, seed)
        y = z[:, :c.ld]
        out, logits, experts, weights = mp.meteora_gemv_expand(x, gemv_zt(c, x, gate, a, seed), b, s, c.spans,
                                                               gate_parts=parts, out_dtype=x.dtype, **kw)
    else:
        z, parts = routed_expand_z(c, x, gate, a, seed)
        whole = sum(size for _, size in c.spans) == c.ld
        if whole:  # the base output is z's first ld columns (f32); y is then that
            y = z[:, :c.ld]
        out, logits, experts, weights = mp.meteora_routed_expand(z, b, s, c.spans, gate_parts=parts,
                                                                 y=None if whole else y, **kw)
    assert_routed_packed(c, x, y, gate, a, b, s, out, logits, experts, weights)


def assert_routed_packed(c: PCase, x, y, gate, a, b, s, out, logits, experts, weights):
    """A packed routed result (out, logits, experts, weights) of inputs (x, y, gate, a, b, s) of case c, against
    `meteora.route` and the gathering float32 reference per member, as `check_routed_packed` describes."""
    m, e, r = len(c.spans), c.e, c.r
    k = 1 if c.forced is not None else c.k
    assert out.shape == y.shape and out.dtype == x.dtype
    assert logits.shape == (c.n, m, e) and experts.shape == weights.shape == (c.n, m, k)
    want = np.asarray(y, np.float32).copy()
    for j, (off, size) in enumerate(c.spans):
        lg, w, ex = member_routing(c, x, gate, j)
        aj = a[:, j * e * r:(j + 1) * e * r].reshape(c.d, e, r).transpose(1, 0, 2)
        bj = b[:, off:off + size].reshape(e, r, size)
        delta = mp.meteora_reference(x, aj, bj, s[j], ex, w).astype(jnp.float32)
        want[:, off:off + size] += np.asarray(delta)
        np.testing.assert_array_equal(np.asarray(experts[:, j]), np.asarray(ex), err_msg=f"experts of member {j}")
        assert_close(logits[:, j], lg, 1e-5, f"logits of member {j}")
        assert_close(weights[:, j], w, 1e-5, f"weights of member {j}", slack=weights_slack(lg, c.temperature))
        assert_close(np.asarray(out, np.float32)[:, off:off + size] - np.asarray(y, np.float32)[:, off:off + size],
                     want[:, off:off + size] - np.asarray(y, np.float32)[:, off:off + size], TOL[c.dtype],
                     f"delta of member {j}", slack=rounding_slack(want[:, off:off + size], out.dtype))
    outside = np.ones(c.ld, bool)
    for off, size in c.spans:
        outside[off:off + size] = False
    np.testing.assert_array_equal(np.asarray(out)[:, outside], np.asarray(y)[:, outside], err_msg="outside spans")


@pytest.mark.parametrize("case", PACKED_CPU, ids=str)
def test_routed_packed_interpret(case):
    check_routed_packed(case, interpret=True, seed=int(np.random.default_rng().integers(1 << 30)))


PACKED_BLOCKS = (  # other tilings of the shrink: one D range (plain stores, no zeroed buffer), narrow blocks,
    # and the pair in one launch
    mp.BlockSizes(routed_splits=1, routed_block_cols=16, routed_block_gate=16),
    mp.BlockSizes(routed_block_in=32, routed_splits=2, routed_block_cols=32, routed_block_gate=16,
                  routed_block_out=32),
    mp.BlockSizes(routed_block_in=32, routed_one_launch=True),
)


@pytest.mark.parametrize("bs", PACKED_BLOCKS, ids=lambda b: f"splits{b.routed_splits}-cols{b.routed_block_cols}"
                         f"-one{int(b.routed_one_launch)}")
@pytest.mark.parametrize("case", PACKED_CPU[:2], ids=str)
def test_routed_packed_tilings_interpret(case, bs):
    check_routed_packed(case, interpret=True, seed=int(np.random.default_rng().integers(1 << 30)), block_sizes=bs)


DENSE_B = mp.BlockSizes(routed_dense_b=True, routed_block_out=32)  # the expand reads all of B's rows, unpicked too


@pytest.mark.parametrize("case", PACKED_CPU, ids=str)
def test_routed_expand_interpret(case):
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_packed(case, interpret=True, seed=seed, via="z")
    check_routed_packed(case, interpret=True, seed=seed, via="z", block_sizes=mp.BlockSizes(routed_block_out=16))
    check_routed_packed(case, interpret=True, seed=seed, via="z", block_sizes=DENSE_B)


def test_routed_expand_bad_args_are_refused():
    c = PACKED_CPU[0]  # spans cover all 80 columns
    x, y, gate, a, b, s = packed_inputs(c, 0)
    z, parts = routed_expand_z(c, x, gate, a, 0)
    kw = dict(gate_parts=parts, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"z must be float32 .* or bfloat16 / float16 .*got int32"):
        mp.meteora_routed_expand(z.astype(jnp.int32), b, s, c.spans, **kw)
    with pytest.raises(ValueError, match=r"z \(1, 66\) must be \[N, ld \+ gate_parts\*m\*E \+ m\*E\*r"):
        mp.meteora_routed_expand(z[:, :66], b, s, c.spans, **kw)
    with pytest.raises(ValueError, match=r"without y, spans .* must cover all 80 columns"):
        mp.meteora_routed_expand(z, b, s, ((0, 48), (48, 16), (66, 14)), **kw)
    with pytest.raises(ValueError, match=r"y \(1, 79\) must be \[N=1, ld=80\]"):
        mp.meteora_routed_expand(z, b, s, c.spans, y=y[:, :79], **kw)
    with pytest.raises(ValueError, match=r"top_k must be in 1..5"):
        mp.meteora_routed_expand(z, b, s, c.spans, **{**kw, "top_k": 6})


GLU_CPU = (  # packed gate/up: two members of equal size
    PCase(1, 64, ((0, 40), (40, 40)), 80, 5, 8, 2),
    PCase(3, 200, ((0, 50), (50, 50)), 100, 7, 6, 3, routing="softmax_topk", temperature=0.7),
    PCase(16, 96, ((0, 40), (40, 40)), 80, 28, 8, 2, "bfloat16"),
    PCase(2, 64, ((0, 40), (40, 40)), 80, 5, 8, 1, forced=3),
)
GLU_GPU = (
    PCase(1, 576, ((0, 1536), (1536, 1536)), 3072, 28, 8, 2, "bfloat16"),  # SmolLM2
    PCase(16, 4096, ((0, 14336), (14336, 14336)), 28672, 28, 8, 2, "bfloat16", temperature=0.5),  # Llama-3-8B
    PCase(3, 200, ((0, 50), (50, 50)), 100, 7, 6, 3, routing="softmax_topk", temperature=0.7),
    PCase(2, 64, ((0, 40), (40, 40)), 80, 5, 8, 1, forced=3),
)


def check_routed_glu(c: PCase, interpret: bool, seed: int, block_sizes=None):
    """`meteora_routed_expand(glu=True)` against float64 numpy: per member, y_j = base_j + sum over the token's
    experts of w * s * (x @ A_e) @ B_e (routing by `meteora.route`), then silu(y_gate) * y_up."""

    x, _, gate, a, b, s = packed_inputs(c, seed)
    z, parts = routed_expand_z(c, x, gate, a, seed)
    out, logits, experts, weights = mp.meteora_routed_expand(
        z, b, s, c.spans, gate_parts=parts, top_k=c.k, temperature=c.temperature, routing=c.routing,
        forced_expert=c.forced, glu=True, block_sizes=block_sizes, interpret=interpret)
    e, r, half = c.e, c.r, c.ld // 2
    k = 1 if c.forced is not None else c.k
    assert out.shape == (c.n, half) and out.dtype == x.dtype
    assert logits.shape == (c.n, 2, e) and experts.shape == weights.shape == (c.n, 2, k)
    x64, z64, tok = np.asarray(x, np.float64), np.asarray(z, np.float64), np.arange(c.n)
    ys = []
    for j, (off, size) in enumerate(c.spans):
        lg, w, ex = member_routing(c, x, gate, j)
        np.testing.assert_array_equal(np.asarray(experts[:, j]), np.asarray(ex), err_msg=f"experts of member {j}")
        assert_close(logits[:, j], lg, 1e-5, f"logits of member {j}")
        assert_close(weights[:, j], w, 1e-5, f"weights of member {j}", slack=weights_slack(lg, c.temperature))
        p = (x64 @ np.asarray(a[:, j * e * r:(j + 1) * e * r], np.float64)).reshape(c.n, e, r)
        bj = np.asarray(b[:, off:off + size], np.float64).reshape(e, r, size)
        ex, w, sj = np.asarray(ex), np.asarray(w, np.float64), np.asarray(s[j], np.float64)
        y = z64[:, off:off + size].copy()
        for slot in range(k):
            pick = ex[:, slot]
            y += (w[:, slot] * sj[pick])[:, None] * np.einsum("nr,nro->no", p[tok, pick], bj[pick])
        ys.append(y)
    want = ys[0] / (1.0 + np.exp(-ys[0])) * ys[1]
    assert_close(out, want, TOL[c.dtype], "silu(gate) * up")
    base = z64[:, :half] / (1.0 + np.exp(-z64[:, :half])) * z64[:, half:c.ld]  # without the adapters: far off
    assert np.abs(base - want).max() > 0.1 * np.abs(want).max()


@pytest.mark.parametrize("case", GLU_CPU, ids=str)
def test_routed_glu_interpret(case):
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_glu(case, interpret=True, seed=seed)
    check_routed_glu(case, interpret=True, seed=seed, block_sizes=mp.BlockSizes(routed_block_out=16))  # ragged
    check_routed_glu(case, interpret=True, seed=seed, block_sizes=DENSE_B)


def test_routed_glu_bad_args_are_refused():
    c = GLU_CPU[0]
    x, y, gate, a, b, s = packed_inputs(c, 0)
    z, parts = routed_expand_z(c, x, gate, a, 0)
    kw = dict(gate_parts=parts, top_k=2, glu=True, interpret=True)
    with pytest.raises(ValueError, match=r"glu=True takes two members of equal size.*\(\(0, 48\), \(48, 32\)\)"):
        mp.meteora_routed_expand(z, b, s, ((0, 48), (48, 32)), **kw)
    with pytest.raises(ValueError, match=r"glu=True takes .* and y"):
        mp.meteora_routed_expand(z, b, s, c.spans, y=y, **kw)


def check_routed_expand_low(c: PCase, interpret: bool, seed: int, glu: bool = False, block_sizes=None):
    """`meteora_routed_expand` from z rounded to bf16 (`BlockSizes.routed_z_low`) against float64 numpy on the
    same rounded values: per member, the logits are the sum of z's gate parts (routing by `meteora.route` on
    them), y_j = base_j (z's columns, or y where the spans leave columns out) + sum over the token's experts of
    w * s * P_e @ B_e with P from z's shrink columns; with `glu`, silu(y_gate) * y_up."""
    from meteora_jax.meteora import route

    x, y, gate, a, b, s = packed_inputs(c, seed)
    z, parts = routed_expand_z(c, x, gate, a, seed)
    z = z.astype(jnp.bfloat16)
    m, e, r, ld = len(c.spans), c.e, c.r, c.ld
    whole = sum(size for _, size in c.spans) == ld
    out, logits, experts, weights = mp.meteora_routed_expand(
        z, b, s, c.spans, gate_parts=parts, top_k=c.k, temperature=c.temperature, routing=c.routing,
        forced_expert=c.forced, y=None if whole or glu else y, out_dtype=x.dtype, glu=glu, block_sizes=block_sizes,
        interpret=interpret)
    k = 1 if c.forced is not None else c.k
    z64, tok, gc = np.asarray(z, np.float64), np.arange(c.n), m * e
    want = z64[:, :ld].copy() if whole or glu else np.asarray(y, np.float64).copy()
    for j, (off, size) in enumerate(c.spans):
        lg = sum(z64[:, ld + t * gc + j * e:ld + t * gc + (j + 1) * e] for t in range(parts)).astype(np.float32)
        if c.forced is None:
            w, ex = (np.asarray(v) for v in route(jnp.asarray(lg), c.k, c.temperature, c.routing))
        else:
            ex, w = np.full((c.n, 1), c.forced), np.ones((c.n, 1))
        np.testing.assert_array_equal(np.asarray(experts[:, j]), ex, err_msg=f"experts of member {j}")
        assert_close(logits[:, j], lg, 1e-6, f"logits of member {j}")
        assert_close(weights[:, j], w, 1e-5, f"weights of member {j}", slack=weights_slack(lg, c.temperature))
        p = z64[:, ld + parts * gc + j * e * r:ld + parts * gc + (j + 1) * e * r].reshape(c.n, e, r)
        bj, sj, w = np.asarray(b[:, off:off + size], np.float64).reshape(e, r, size), np.asarray(s[j]), w.astype(float)
        for slot in range(k):
            pick = ex[:, slot]
            want[:, off:off + size] += (w[:, slot] * sj[pick])[:, None] * np.einsum("nr,nro->no", p[tok, pick],
                                                                                   bj[pick])
    if glu:
        half = ld // 2
        want = want[:, :half] / (1.0 + np.exp(-want[:, :half])) * want[:, half:]
    assert out.shape == want.shape and out.dtype == x.dtype
    assert_close(out, want, TOL[c.dtype], "y + delta" + (" (silu(gate) * up)" if glu else ""),
                 slack=rounding_slack(want, out.dtype))


@pytest.mark.parametrize("case", PACKED_CPU, ids=str)
def test_routed_expand_bf16_z_interpret(case):
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_expand_low(case, interpret=True, seed=seed)
    check_routed_expand_low(case, interpret=True, seed=seed, block_sizes=DENSE_B)


@pytest.mark.parametrize("case", GLU_CPU, ids=str)
def test_routed_glu_bf16_z_interpret(case):
    check_routed_expand_low(case, interpret=True, seed=int(np.random.default_rng().integers(1 << 30)), glu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GLU_GPU, ids=str)
def test_routed_glu_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_glu(case, interpret=False, seed=seed)
    check_routed_glu(case, interpret=False, seed=seed, block_sizes=DENSE_B)
    check_routed_expand_low(case, interpret=False, seed=seed, glu=True)


@pytest.mark.parametrize("case", GLU_GPU[:2], ids=str)
def test_routed_glu_lowers_to_triton(case):
    _, _, _, _, b, s = packed_inputs(case, 0, abstract=True)
    z = jax.ShapeDtypeStruct((case.n, case.ld + (2 + case.r) * 2 * case.e + 13), jnp.float32)
    fn = lambda z, b, s: mp.meteora_routed_expand(z, b, s, case.spans, gate_parts=2, top_k=case.k,  # noqa: E731
                                                  temperature=case.temperature, glu=True, interpret=False)
    text = jax.jit(fn).trace(z, b, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "meteora_routed_glu_z" in text


@pytest.mark.gpu
@pytest.mark.parametrize("case", PACKED_GPU, ids=str)
def test_routed_expand_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_packed(case, interpret=False, seed=seed, via="z")
    check_routed_packed(case, interpret=False, seed=seed, via="z", block_sizes=DENSE_B)
    check_routed_expand_low(case, interpret=False, seed=seed)


@pytest.mark.parametrize("case", PACKED_GPU, ids=str)
def test_routed_expand_lowers_to_triton(case):
    x, y, gate, a, b, s = packed_inputs(case, 0, abstract=True)
    parts = 1 if case.dtype == "float32" else 2
    m = len(case.spans)
    z = jax.ShapeDtypeStruct((case.n, case.ld + (parts + case.r) * m * case.e + 13), jnp.float32)
    whole = sum(size for _, size in case.spans) == case.ld
    fn = lambda z, b, s, y: mp.meteora_routed_expand(z, b, s, case.spans, gate_parts=parts, top_k=case.k,
                                                     temperature=case.temperature, routing=case.routing,
                                                     forced_expert=case.forced, y=None if whole else y,
                                                     interpret=False)
    text = jax.jit(fn).trace(z, b, s, y).lower(lowering_platforms=("cuda",)).as_text()
    assert "meteora_routed_expand_z" in text


@pytest.mark.parametrize("variant", ("dense_b", "bf16_z"))
@pytest.mark.parametrize("glu", (False, True), ids=("expand", "glu"))
def test_routed_expand_variants_lower_to_triton(glu, variant):
    """`BlockSizes.routed_dense_b` (B's tile loaded before the routing) and a bf16 z (`BlockSizes.routed_z_low`)
    compile for Triton too."""
    case = GLU_GPU[0] if glu else PACKED_GPU[0]
    _, _, _, _, b, s = packed_inputs(case, 0, abstract=True)
    zdt, bs = (jnp.float32, DENSE_B) if variant == "dense_b" else (jnp.bfloat16, None)
    z = jax.ShapeDtypeStruct((case.n, case.ld + (2 + case.r) * len(case.spans) * case.e + 13), zdt)
    fn = lambda z, b, s: mp.meteora_routed_expand(z, b, s, case.spans, gate_parts=2, top_k=case.k,  # noqa: E731
                                                  temperature=case.temperature, glu=glu, block_sizes=bs,
                                                  interpret=False)
    text = jax.jit(fn).trace(z, b, s).lower(lowering_platforms=("cuda",)).as_text()
    assert ("meteora_routed_glu_z" if glu else "meteora_routed_expand_z") in text


@pytest.mark.parametrize("ld", (64, 4096))
def test_expand_block_sizes_reach_the_launch(ld):
    """The packed decode expand takes 32 output columns per program for a group of fewer than 4096 columns, else 128
    (`BlockSizes.routed_out_block`), unless `routed_block_out` says otherwise, and `routed_warps` warps: as seen in
    the Triton launch's grid and warps."""
    e, r = 4, 8
    z = jax.ShapeDtypeStruct((1, ld + 2 * e + e * r), jnp.float32)
    b, s = jax.ShapeDtypeStruct((e * r, ld), jnp.bfloat16), jax.ShapeDtypeStruct((1, e), jnp.float32)
    for bs, cols, warps in ((None, 32 if ld < 4096 else 128, 4), (mp.BlockSizes(routed_block_out=64), 64, 4),
                            (mp.BlockSizes(routed_warps=2), 32 if ld < 4096 else 128, 2)):
        fn = lambda z, b, s, bs=bs: mp.meteora_routed_expand(z, b, s, ((0, ld),), gate_parts=2, top_k=2,  # noqa: E731
                                                             block_sizes=bs, interpret=False)[0]
        text = jax.jit(fn).trace(z, b, s).lower(lowering_platforms=("cuda",)).as_text()
        assert re.findall(r"grid_x = (\d+)", text) == [str(ld // cols)], bs
        assert re.findall(r"num_warps = (\d+)", text) == [str(warps)], bs


@pytest.mark.parametrize("ld", (64, 4096))
def test_routed_pair_block_sizes_reach_the_launch(ld):
    """The routed pair's expand (packed mode routed; strategy fused) follows the same rule: 32 output columns per
    program below 4096 columns, else 128, unless `routed_block_out` says otherwise (the second launch's grid)."""
    e, r, d = 4, 8, 64
    x, y = jax.ShapeDtypeStruct((1, d), jnp.bfloat16), jax.ShapeDtypeStruct((1, ld), jnp.bfloat16)
    gate, a = jax.ShapeDtypeStruct((d, e), jnp.float32), jax.ShapeDtypeStruct((d, e * r), jnp.bfloat16)
    b, s = jax.ShapeDtypeStruct((e * r, ld), jnp.bfloat16), jax.ShapeDtypeStruct((1, e), jnp.float32)
    for bs, cols in ((None, 32 if ld < 4096 else 128), (mp.BlockSizes(routed_block_out=64), 64)):
        fn = lambda *args, bs=bs: mp.meteora_routed_packed(*args, ((0, ld),), top_k=2, block_sizes=bs,  # noqa: E731
                                                           interpret=False)[0]
        text = jax.jit(fn).trace(x, y, gate, a, b, s).lower(lowering_platforms=("cuda",)).as_text()
        grids = re.findall(r"grid_x = (\d+)", text)
        assert len(grids) == 2 and grids[1] == str(ld // cols), (bs, grids)  # shrink, then expand


def test_launches_of_one_kernel_lower_once_and_keep_their_own_settings():
    """Kernel launches go through one jitted function (`mp._launch`). In one program, launches of one kernel with
    equal settings and shapes (as a model's layers make them) lower to one Triton kernel, called from each place;
    a launch with other settings (top-k, temperature) gets a kernel of its own, and each launch's result is its
    own (against the float32 reference, in interpret mode)."""
    c2 = PACKED_CPU[0]  # top-2, a whole z
    c1 = dataclasses.replace(c2, k=1, temperature=0.5)
    seed = int(np.random.default_rng().integers(1 << 30))
    x, _, gate, a, b, s = packed_inputs(c2, seed)
    z, parts = routed_expand_z(c2, x, gate, a, seed)

    def launches(z, b, s, interpret):
        return [mp.meteora_routed_expand(z, b, s, c.spans, gate_parts=parts, top_k=c.k, temperature=c.temperature,
                                         interpret=interpret) for c in (c2, c1, c2, c2)]

    lowered = jax.jit(functools.partial(launches, interpret=False)).trace(z, b, s).lower(
        lowering_platforms=("cuda",)).as_text()
    assert lowered.count("custom_call @__gpu$xla.gpu.triton") == 2, "one Triton kernel per settings"
    assert len(re.findall(r"= call @", lowered)) == 4, "each launch calls its kernel's function"
    for c, (out, logits, experts, weights) in zip((c2, c1, c2, c2), jax.jit(functools.partial(
            launches, interpret=True))(z, b, s), strict=True):
        assert_routed_packed(c, x, z[:, :c.ld], gate, a, b, s, out, logits, experts, weights)


@pytest.mark.gpu
@pytest.mark.parametrize("case", PACKED_GPU, ids=str)
def test_routed_packed_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_packed(case, interpret=False, seed=seed)
    for bs in (PACKED_BLOCKS[0], mp.BlockSizes(routed_one_launch=True)):
        for _ in range(3 if bs.routed_one_launch else 1):  # the counter wait: repeated to catch races
            check_routed_packed(case, interpret=False, seed=seed, block_sizes=bs)


@pytest.mark.parametrize("bs", (None, *PACKED_BLOCKS, mp.BlockSizes(routed_one_launch=True)),
                         ids=lambda b: f"splits{b.routed_splits}-one{int(b.routed_one_launch)}" if b else "default")
@pytest.mark.parametrize("case", PACKED_GPU, ids=str)
def test_routed_packed_lowers_to_triton(case, bs):
    """The GPU cases lower through Pallas' Triton backend (no GPU needed to lower): catches kernels that interpret
    mode runs but Triton cannot compile, before the device does."""
    x, y, gate, a, b, s = packed_inputs(case, 0, abstract=True)
    fn = lambda *p: mp.meteora_routed_packed(*p, case.spans, top_k=case.k, temperature=case.temperature,
                                             routing=case.routing, forced_expert=case.forced, block_sizes=bs,
                                             interpret=False)
    text = jax.jit(fn).trace(x, y, gate, a, b, s).lower(lowering_platforms=("cuda",)).as_text()
    one = bs is not None and bs.routed_one_launch and mp.routed_tiles(bs, case.n, case.d)[3] > 1
    names = ("meteora_routed_one",) if one else ("meteora_routed_shrink", "meteora_routed_expand")
    assert all(name in text for name in names), names


def test_routed_packed_bad_args_are_refused():
    x, y, gate, a, b, s = packed_inputs(PACKED_CPU[0], 0)
    spans = PACKED_CPU[0].spans
    with pytest.raises(ValueError, match=r"inconsistent shapes"):
        mp.meteora_routed_packed(x, y, gate[:, :10], a, b, s, spans, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"spans .* must be non-empty, ordered, disjoint"):
        mp.meteora_routed_packed(x, y, gate, a, b, s, ((0, 48), (40, 16), (64, 16)), top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"spans .* must be non-empty, ordered, disjoint"):
        mp.meteora_routed_packed(x, y, gate, a, b, s, ((0, 48), (48, 16), (64, 17)), top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"top_k must be in 1..5"):
        mp.meteora_routed_packed(x, y, gate, a, b, s, spans, top_k=6, interpret=True)


def test_model_decode_uses_the_routed_kernels(monkeypatch):
    """A MeteoRA linear with strategy `fused` runs calls of at most `max_tokens` tokens through `meteora_routed`
    and returns what `dense` returns: output, logits, experts, weights; longer calls take the other path."""
    from meteora_jax import fused
    from meteora_jax.meteora import MeteoraConfig, MeteoraLinear

    calls = []

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return mp.meteora_routed(*args, **kw)

    monkeypatch.setitem(fused.ROUTED, "fused", fused.Routed(spy, 6))
    mcfg = MeteoraConfig(expert_names=tuple("abcde"), rank=4, top_k=2, temperature=0.8)
    lin = MeteoraLinear(48, 40, use_bias=True, config=mcfg, dtype="float32", param_dtype="float32",
                        rngs=nnx.Rngs(7))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 48)), jnp.float32)
    ref_y, ref_r = lin(x)
    lin.set_routing(mcfg.replace(strategy="fused"))
    y, r = lin(x)
    assert_close(y, ref_y, 1e-5, "y")
    np.testing.assert_array_equal(np.asarray(r.experts), np.asarray(ref_r.experts))
    assert_close(r.weights, ref_r.weights, 1e-5, "weights")
    assert_close(r.logits, ref_r.logits, 1e-5, "logits")
    assert calls == [(6, 48)]
    x7 = jnp.concatenate([x.reshape(6, 48), x[0, :1]])
    y7, _ = lin(x7)
    assert calls == [(6, 48)]  # 7 tokens: the two-launch strategy path
    lin.set_routing(mcfg)
    assert_close(y7, lin(x7)[0], 1e-5, "y (7 tokens)")


# ------------------------------------------------- base product + adapter term in one launch (meteora_gemv)
GEMV_CPU = (  # ragged D and out tiles, r not a power of two, experts no token picks, all tokens on one expert
    Case(1, 96, 40, 5, 3, 2),
    Case(3, 70, 33, 4, 8, 2, routing="one"),
    Case(5, 130, 24, 6, 5, 1, routing="unused"),
    Case(2, 64, 48, 3, 4, 3, "bfloat16"),
    Case(20, 48, 40, 5, 4, 2),
)
GEMV_GPU = (
    Case(1, 4096, 4096, 28, 8, 2, "bfloat16"),
    Case(1, 4096, 1024, 28, 8, 2, "bfloat16"),
    Case(1, 576, 1536, 10, 8, 2, "bfloat16"),
    Case(1, 1000, 300, 7, 5, 1, routing="unused"),
    Case(4, 4096, 4096, 28, 8, 2, "bfloat16", routing="one"),
    Case(16, 4096, 1024, 28, 16, 2, "bfloat16"),
    Case(16, 576, 192, 10, 8, 2),
    Case(7, 300, 100, 9, 3, 3, routing="unused"),
    Case(64, 4096, 4096, 28, 8, 2, "bfloat16"),
    Case(33, 1000, 300, 7, 5, 1),
)
GEMV_BLOCKS = mp.BlockSizes(gemv_block_out=4, gemv_block_out_tokens=16, gemv_block_in=32, gemv_block_in_tokens=16,
                            gemv_shrink_splits=3, gemv_shrink_block_in=16, gemv_shrink_pairs=2, gemv_dense_from=4,
                            routed_block_in=16, routed_splits=3, routed_block_cols=16)  # 2, 3 tokens: pairs


def gemv_inputs(case: Case, seed: int):
    (x, a, b, s, experts, weights), cot = make_inputs(case, seed)
    wt = jnp.asarray(np.random.default_rng(seed + 7).standard_normal((case.o, case.d)) / case.d ** 0.5, x.dtype)
    return (x, wt, a, b, s, experts, weights), cot


def gemv_float64(x, wt, a, b, s, experts, weights):
    """x @ wt^T + sum_j w_j s_e (x a_e) b_e in float64 numpy, one token and slot at a time."""
    f = lambda t: np.asarray(t, np.float64)  # noqa: E731
    x, wt, a, b, s, weights = map(f, (x, wt, a, b, s, weights))
    y = x @ wt.T
    for i, (es, ws) in enumerate(zip(np.asarray(experts), weights, strict=True)):
        for e, w in zip(es, ws, strict=True):
            y[i] += w * s[e] * (x[i] @ a[e]) @ b[e]
    return y


def check_gemv(case: Case, interpret: bool, bs=None, seed: int = 0):
    args, cot = gemv_inputs(case, seed)
    fn = lambda *p: mp.meteora_gemv(*p[:5], args[5], p[5], block_sizes=bs, interpret=interpret)  # noqa: E731
    diff = (0, 1, 2, 3, 4, 6)  # x, wt, a, b, scaling, weights
    p = [args[i] for i in diff]
    out = fn(*p)
    assert out.shape == (case.n, case.o) and out.dtype == args[0].dtype
    assert_close(out, gemv_float64(*args), TOL[case.dtype], "meteora_gemv")

    def formula(x, wt, a, b, s, w):  # the same sum in jnp, f32, gathering each token's experts
        f32 = jnp.float32
        ae, be = a.astype(f32)[args[5]], b.astype(f32)[args[5]]
        h = jnp.einsum("nd,nkdr->nkr", x.astype(f32), ae, precision="highest") * (w * s[args[5]])[..., None]
        return x.astype(f32) @ wt.astype(f32).T + jnp.einsum("nkr,nkro->no", h, be, precision="highest")

    grads = jax.grad(lambda *q: jnp.sum(fn(*q).astype(jnp.float32) * cot.astype(jnp.float32)), argnums=range(6))(*p)
    want = jax.grad(lambda *q: jnp.sum(formula(*q) * cot.astype(jnp.float32)), argnums=range(6))(*p)
    for what, g, gw in zip(("dx", "dwt", "da", "db", "dscaling", "dweights"), grads, want, strict=True):
        assert_close(g, gw, TOL[case.dtype], f"meteora_gemv {what}")


@pytest.mark.parametrize("bs", (None, GEMV_BLOCKS), ids=("default", "small-tiles"))
@pytest.mark.parametrize("case", GEMV_CPU, ids=str)
def test_gemv_interpret(case, bs):
    check_gemv(case, interpret=True, bs=bs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GEMV_GPU, ids=str)
def test_gemv_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    check_gemv(case, interpret=False)
    check_gemv(case, interpret=False, bs=GEMV_BLOCKS, seed=3)


@pytest.mark.parametrize("case", GEMV_GPU[::3], ids=str)
def test_gemv_lowers_to_triton(case):
    args = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in gemv_inputs(case, 0)[0]]
    text = jax.jit(lambda *p: mp.meteora_gemv(*p, interpret=False)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "meteora_gemv" in text


def test_gemv_bad_args_are_refused():
    (x, wt, a, b, s, e, w), _ = gemv_inputs(Case(2, 32, 16, 3, 4, 2), 0)
    with pytest.raises(ValueError, match=r"wt \(32, 16\) must be the base weight transposed, \[out=16, in=32\]"):
        mp.meteora_gemv(x, wt.T, a, b, s, e, w, interpret=True)
    x65 = jnp.zeros((65, 32), x.dtype)
    with pytest.raises(ValueError, match=r"takes 1..64 tokens"):
        mp.meteora_gemv(x65, wt, a, b, s, jnp.zeros((65, 2), jnp.int32), jnp.ones((65, 2)), interpret=True)


GEMV_PACKED_CPU = tuple(c for c in PACKED_CPU if sum(size for _, size in c.spans) == c.ld)  # spans cover y
GEMV_PACKED_GPU = tuple(c for c in PACKED_GPU if sum(size for _, size in c.spans) == c.ld)


@pytest.mark.parametrize("case", GEMV_PACKED_CPU, ids=str)
def test_gemv_expand_interpret(case):
    seed = int(np.random.default_rng().integers(1 << 30))
    check_routed_packed(case, interpret=True, seed=seed, via="gemv")
    check_routed_packed(case, interpret=True, seed=seed, via="gemv", block_sizes=GEMV_BLOCKS)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GEMV_PACKED_GPU, ids=str)
def test_gemv_expand_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    check_routed_packed(case, interpret=False, via="gemv")
    check_routed_packed(case, interpret=False, seed=5, via="gemv", block_sizes=GEMV_BLOCKS)


@pytest.mark.parametrize("case", GEMV_PACKED_GPU[::2], ids=str)
def test_gemv_expand_lowers_to_triton(case):
    x, _, gate, a, b, s = packed_inputs(case, 0)
    zt = gemv_zt(case, x, gate, a, 0)
    kw = dict(gate_parts=len(gate_parts(gate, x.dtype)), top_k=case.k, temperature=case.temperature,
              routing=case.routing, forced_expert=case.forced, interpret=False)
    args = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (x, zt, b, s)]
    text = jax.jit(lambda x, zt, b, s: mp.meteora_gemv_expand(x, zt, b, s, case.spans, **kw)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "meteora_gemv_expand" in text


def test_gemv_expand_bad_args_are_refused():
    c = PACKED_CPU[0]
    x, _, gate, a, b, s = packed_inputs(c, 0)
    zt = gemv_zt(c, x, gate, a, 0)
    kw = dict(gate_parts=1, top_k=2, interpret=True)
    with pytest.raises(ValueError, match=r"zt \(.*\) must be \[ld \+ gate_parts\*m\*E"):
        mp.meteora_gemv_expand(x, zt[:, :10], b, s, c.spans, **kw)
    with pytest.raises(ValueError, match="must cover all 80 columns"):
        mp.meteora_gemv_expand(x, zt, b, s, ((0, 48), (48, 16), (66, 14)), **kw)
    with pytest.raises(ValueError, match=r"takes 1..64 tokens"):
        mp.meteora_gemv_expand(jnp.zeros((65, c.d), x.dtype), zt, b, s, c.spans, **kw)


# ------------------------------------------------------- meteora_linear: base product + expand, one reduction
LINEAR_CPU = (Case(37, 96, 80, 7, 8, 2, "bfloat16"), Case(21, 64, 40, 6, 5, 1, "float32", "one"),
              Case(19, 64, 48, 7, 6, 3, "float32", "unused"))
LINEAR_GPU = (Case(1024, 4096, 4096, 28, 8, 2, "bfloat16"), Case(4096, 4096, 1024, 28, 8, 2, "bfloat16"),
              Case(777, 1024, 2048, 8, 16, 1, "float32"), Case(513, 512, 768, 64, 64, 2, "bfloat16"),
              Case(300, 768, 520, 10, 12, 2, "bfloat16", "unused"), Case(200, 256, 384, 6, 5, 1, "float32", "one"))
LINEAR_BLOCKS = mp.BlockSizes(linear_block_tokens=16, linear_block_out=32, linear_block_in=16, shrink_block_in=16)


def check_linear(case: Case, interpret: bool, bs=None, seed: int | None = None):
    seed = int(np.random.default_rng().integers(1 << 30)) if seed is None else seed
    (x, a, b, s, e, w), cot = make_inputs(case, seed)
    wb = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((case.d, case.o)) / case.d ** 0.5, x.dtype)
    fn = lambda x, wb, a, b, s, w: mp.meteora_linear(x, wb, a, b, s, e, w, block_sizes=bs, interpret=interpret)
    ref = lambda x, wb, a, b, s, w: mp.linear_reference(x, wb, a, b, s, e, w)
    p = (x, wb, a, b, s, w)
    tol = TOL[case.dtype]
    out = fn(*p)
    assert out.shape == (case.n, case.o) and out.dtype == x.dtype
    assert_close(out, ref(*p), tol, f"meteora_linear forward (seed {seed})")
    loss = lambda f: lambda *q: jnp.sum(f(*q).astype(jnp.float32) * cot.astype(jnp.float32))  # noqa: E731
    grads = jax.grad(loss(fn), argnums=range(6))(*p)
    want = jax.grad(loss(ref), argnums=range(6))(*p)
    for what, g, gw, arg in zip(("dx", "dw", "da", "db", "dscaling", "dweights"), grads, want, p, strict=True):
        assert g.shape == arg.shape, what
        assert_close(g, gw, tol, f"meteora_linear {what} (seed {seed})")


@pytest.mark.parametrize("bs", (None, LINEAR_BLOCKS), ids=("default", "small-tiles"))
@pytest.mark.parametrize("case", LINEAR_CPU, ids=str)
def test_linear_interpret(case, bs):
    check_linear(case, interpret=True, bs=bs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", LINEAR_GPU, ids=str)
def test_linear_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU (run on the device machine)")
    check_linear(case, interpret=False)


@pytest.mark.parametrize("case", LINEAR_GPU[:2], ids=str)
def test_linear_lowers_to_triton(case):
    (x, a, b, s, e, w), _ = make_inputs(dataclasses.replace(case, n=3), 0)
    args = [jax.ShapeDtypeStruct((case.n, case.d), x.dtype), jax.ShapeDtypeStruct((case.d, case.o), x.dtype),
            *[jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (a, b, s)],
            jax.ShapeDtypeStruct((case.n, case.k), e.dtype), jax.ShapeDtypeStruct((case.n, case.k), w.dtype)]
    text = jax.jit(lambda *p: mp.meteora_linear(*p, interpret=False)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "meteora_linear" in text and "meteora_shrink" in text


def test_linear_bad_args_are_refused():
    (x, a, b, s, e, w), _ = make_inputs(Case(4, 32, 16, 3, 4, 2), 0)
    with pytest.raises(ValueError, match=r"w \(16, 32\) must be \[in=32, out=16\]"):
        mp.meteora_linear(x, jnp.zeros((16, 32), x.dtype), a, b, s, e, w, interpret=True)


def test_model_fused_linear_path_equals_gather():
    """With `fused` and the linear path switched on (here for every call), calls run `meteora_linear`; the logits
    and the gates' gradient equal the `gather` strategy's. (Off by default: no call takes it.)"""
    from meteora_jax.config import LlamaConfig
    from meteora_jax.meteora import GateParam, MeteoraConfig, MeteoraLlama, set_routing

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    mcfg = MeteoraConfig(expert_names=("a", "b", "c"), rank=4, target_modules=("q_proj", "down_proj"))
    model = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng()
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)))
    cot = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)

    def run(m):
        loss = lambda m: jnp.sum(m(tokens).logits * cot)  # noqa: E731
        return m(tokens).logits, nnx.grad(loss, argnums=nnx.DiffState(0, GateParam))(m)

    ref, ref_g = run(model)
    calls = []
    real = mp.meteora_linear
    try:
        mp.meteora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
        set_routing(model, strategy="fused")
        model(tokens)
        assert not calls, "the linear path is off by default"
        mp.set_default_block_sizes(mp.BlockSizes(linear_min_tokens=1, linear_max_tokens=1 << 20))
        out, g = run(model)
    finally:
        mp.meteora_linear = real
        mp.set_default_block_sizes(None)
    assert calls, "the fused strategy did not take the linear path"
    assert_close(out, ref, 1e-4, "logits")
    for (path, gv), (_, rv) in zip(nnx.to_flat_state(g), nnx.to_flat_state(ref_g), strict=True):
        assert_close(gv.get_value(), rv.get_value(), 1e-4, f"gate grad {path}")
