"""The built-in default of `python -m meteora_jax.train`: a small but real MeteoRA run that it builds itself.

1. Four text tasks (`reverse`, `capitals`, `add`, `morse`), generated from a seed, written as task folders.
2. A byte-pair tokenizer trained on them with `tokenizers`, saved as a Hugging Face tokenizer.
3. A tiny Llama base (random) and one LoRA expert per task, each fitted on its own task with the expert
   forced (what a user's PEFT adapters are), saved as a MeteoRA checkpoint.
Gate training then starts from that checkpoint, never told the task, and learns to route each token to
the expert of its task. On a 2-core CPU the whole run takes a few minutes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from meteora_jax import checkpoint as ckpt_lib
from meteora_jax.config import LlamaConfig
from meteora_jax.llama import Llama
from meteora_jax.meteora import ExpertParam, ExpertWeights, MeteoraConfig, attach_experts, set_routing

TASKS = ("reverse", "capitals", "add", "morse")
MORSE = dict(zip("abcdefghijklmnopqrstuvwxyz", (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- -..- -.-- --..")
    .split(), strict=True))
WORDS = ("apple river stone cloud green tiger piano lemon house night ocean paper light storm bread "
         "chair dance eagle flame grape honey juice knife magic novel orbit pearl queen robot sugar").split()
PROMPT_FORMAT = "{prompt} =>"


def make_sample(task: str, rng: np.random.Generator) -> dict:
    if task == "reverse":
        w = WORDS[rng.integers(len(WORDS))]
        return {"prompt": f"reverse {w}", "response": w[::-1]}
    if task == "capitals":
        ws = " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=2))
        return {"prompt": f"capitals {ws}", "response": ws.upper()}
    if task == "add":
        a, b = rng.integers(10, 500, size=2)
        return {"prompt": f"add {a} + {b}", "response": str(a + b)}
    w = WORDS[rng.integers(len(WORDS))][:3]
    return {"prompt": f"morse {w}", "response": " / ".join(MORSE[c] for c in w)}


def write_tasks(folder: Path, seed: int, n_train: int = 320, n_test: int = 48) -> None:
    rng = np.random.default_rng(seed)
    for task in TASKS:
        (folder / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            rows = [json.dumps(make_sample(task, rng)) for _ in range(n)]
            (folder / task / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def build_tokenizer(folder: Path, data: Path):
    """A small byte-level BPE trained on the task files, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in sorted(data.rglob("*.jsonl"))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def base_config(vocab_size: int, dtype: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                       tie_word_embeddings=True, dtype=dtype)


def fit_experts(model, tokenizer, data: Path, seed: int, steps: int = 60) -> None:
    """Fit expert i on task i alone (expert forced, experts trained), as per-task LoRA training would."""
    from meteora_jax import data as data_lib
    from meteora_jax.train import TrainConfig, build_step, make_optimizer

    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=5, batch_size=16, gate_coef=0.0)
    names = model.meteora_config.expert_names
    samples = data_lib.load_tasks(data, names, "train", PROMPT_FORMAT)
    for i, name in enumerate(names):
        examples, _ = data_lib.tokenize([s for s in samples if s.tasks == (i,)], tokenizer, 64)
        plan = data_lib.BatchPlan(examples, cfg.batch_size, [32, 64], seed + i, tokenizer.pad_token_id)
        set_routing(model, forced_expert=i)
        opt, _ = make_optimizer(model, cfg, ExpertParam)
        graphdef, state = nnx.split((model, opt))
        step = build_step(graphdef, ExpertParam, cfg)
        batches = plan.batches()
        for _ in range(steps):
            state, m = step(state, next(batches).as_dict())
        nnx.update(model, state[0])
        print(f"  expert {name!r} fitted on its task: LM loss {float(m['lm_loss']):.3f}")
    set_routing(model, forced_expert=None)


def setup(folder: Path, seed: int = 0, dtype: str = "float32"):
    """(model, tokenizer, data folder, prompt format) of the demo, built under `folder` (reused if already there)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    data, tok_dir, ckpt = folder / "data", folder / "tokenizer", folder / "meteora_init"
    if ckpt.exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
        return ckpt_lib.load(ckpt, dtype=dtype), tokenizer, data, PROMPT_FORMAT
    print(f"building the demo in {folder}: tasks {TASKS}, tokenizer, tiny base, one LoRA expert per task")
    write_tasks(data, seed)
    tokenizer = build_tokenizer(tok_dir, data)
    config = base_config(len(tokenizer), dtype)
    base = Llama(config, rngs=nnx.Rngs(seed))
    rank = 8
    key = jax.random.key(seed + 1)
    experts = {}
    for layer, name, lin in meteora_linears_shapes(base):
        key, ka = jax.random.split(key)
        d_in, d_out = lin
        a = np.asarray(jax.random.normal(ka, (len(TASKS), d_in, rank))) / np.sqrt(d_in)
        experts[(layer, name)] = ExpertWeights(a, np.zeros((len(TASKS), rank, d_out), np.float32),
                                               np.full(len(TASKS), 2.0, np.float32))
    sources = tuple(json.dumps({"name": t, "demo": True, "r": rank, "lora_alpha": 2 * rank}) for t in TASKS)
    mcfg = MeteoraConfig(expert_names=TASKS, rank=rank, top_k=2)
    model = attach_experts(base, mcfg, experts, seed=seed, expert_sources=sources)
    fit_experts(model, tokenizer, data, seed)
    ckpt_lib.save(ckpt, model, overwrite=True)
    return model, tokenizer, data, PROMPT_FORMAT


def meteora_linears_shapes(base: Llama):
    """`[(layer, module, (in, out))]` of every target linear of a plain Llama."""
    out = []
    for i, layer in enumerate(base.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                lin = getattr(parent, name, None)
                if lin is not None:
                    out.append((i, name, tuple(lin.kernel.shape)))
    return out

