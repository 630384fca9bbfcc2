"""The fused MeteoRA kernels (Pallas `fused`, Triton `triton`) against the pure-JAX reference, forward and grad.

Laid out like jax's `tests/pallas/gpu_ops_test.py`: `TestKernelsGpu` (INTERPRET = False, marker `gpu`) runs
on the device machine with many shapes; `TestKernelsInterpret` runs the Pallas kernels in interpret mode on
the CPU with a few small shapes. Every case draws fresh random inputs; the reference gathers each token's
experts in float32. Tolerance: max |ours - ref| <= tol * max |ref| (bf16 1e-2, fp32 1e-5).
"""

from __future__ import annotations

import dataclasses

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

    def __str__(self):
        return (f"n{self.n}-d{self.d}-o{self.o}-e{self.e}-r{self.r}-k{self.k}-{self.dtype}-{self.routing}"
                f"-dec{self.decode}")


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


def assert_close(ours, ref, tol, what):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert scale > 0, f"{what}: reference is all zeros (the test would prove nothing)"
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} * {scale:.3g}"


class KernelsBase:
    """The checks; subclasses say where they run and on which shapes."""

    INTERPRET = False
    CASES: tuple[Case, ...] = ()
    IMPLS = ("fused",)

    def impl(self, name, case):
        bs = mp.BlockSizes(decode_max_tokens=case.decode)
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
