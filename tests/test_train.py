"""Gate training: what trains, that it learns, exact resume after a kill, checkpoint integrity, bad data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from meteora_jax import checkpoint
from meteora_jax.config import LlamaConfig
from meteora_jax.data import DataError, composite, load_tasks, tokenize
from meteora_jax.meteora import MeteoraConfig, MeteoraLlama
from meteora_jax.train import TrainConfig, train
from meteora_jax.train_state import TrainCheckpoints

# four tasks with disjoint vocabularies: every token tells its task (a separable set-up)
VOCAB = {
    "alpha": "ant bee cat dog eel fox gnu hen",
    "digits": "one two three four five six seven eight",
    "colour": "red blue green pink grey gold teal cyan",
    "metal": "iron zinc lead tin nickel cobalt copper silver",
}


def _write_tasks(root: Path, seed=0, n_train=48, n_test=16):
    rng = np.random.default_rng(seed)
    for task, words in VOCAB.items():
        w = words.split()
        (root / task).mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            rows = []
            for _ in range(n):
                p = " ".join(rng.choice(w, size=3))
                rows.append(json.dumps({"prompt": p, "response": " ".join(rng.choice(w, size=2))}))
            (root / task / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def _word_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + sorted({w for ws in VOCAB.values() for w in ws.split()})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    _write_tasks(root / "data")
    tok = _word_tokenizer(root / "tok")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    # Separable by construction: each task's words sit around their own centre in embedding space, so
    # every layer's normalised hidden state tells the task. o_proj / down_proj are left out: their inputs
    # are tiny in a random model (weights ~ N(0, 0.02)), so their gates learn far more slowly.
    mcfg = MeteoraConfig(expert_names=tuple(VOCAB), rank=4, top_k=2,
                         target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    model = MeteoraLlama(cfg, mcfg, rngs=nnx.Rngs(0))
    emb = np.array(model.embed_tokens.embedding.get_value())
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(len(VOCAB), emb.shape[1]))
    for t, words in enumerate(VOCAB.values()):
        for w in words.split():
            emb[tok.convert_tokens_to_ids(w)] = centres[t] + 0.3 * rng.normal(size=emb.shape[1])
    model.embed_tokens.embedding.set_value(jax.numpy.asarray(emb))
    checkpoint.save(root / "ckpt", model)
    return root


def _cfg(setup, run_dir, **kw):
    base = dict(checkpoint=str(setup / "ckpt"), tokenizer=str(setup / "tok"), data=str(setup / "data"),
                prompt_format="{prompt}", run_dir=str(run_dir), steps=6, batch_size=8, buckets="8",
                max_len=8, eval_every=0, save_every=100, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("what", ["gates", "gates,experts"])
def test_only_asked_params_change(setup, tmp_path, what):
    before = _params(checkpoint.load(setup / "ckpt"))
    out = train(_cfg(setup, tmp_path / "run", train=what, steps=4, lr=1e-2))
    after = _params(checkpoint.load(out["final_checkpoint"]))
    assert before.keys() == after.keys()
    for k in before:
        leaf = k.rsplit(".", 1)[-1]
        changed = not np.array_equal(before[k], after[k])
        if leaf == "gate" or (leaf in ("lora_a", "lora_b") and "experts" in what):
            assert changed, f"{k} did not train"
        else:
            assert not changed, f"{k} changed but must stay frozen"
            assert before[k].dtype == after[k].dtype


def test_separable_tasks_learn(setup, tmp_path):
    out = train(_cfg(setup, tmp_path / "run", steps=40, lr=0.1, warmup_steps=5, eval_every=40, eval_batches=0))
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in log if "loss" in x]
    first, last = np.mean([x["loss"] for x in steps[:5]]), np.mean([x["loss"] for x in steps[-5:]])
    assert last < first - 0.3, (first, last)
    ev = out["last"]["eval"]
    assert ev["gate_acc"] >= 0.95, ev
    assert all(v >= 0.9 for v in ev["gate_acc_per_task"].values()), ev


def test_few_eval_batches_sample_every_task(setup, tmp_path):
    """--eval-batches 2 of 8 (16 test rows of each of 4 tasks, written task after task): the evaluated rows come
    from several tasks, the same ones at every evaluation."""
    train(_cfg(setup, tmp_path / "run", steps=4, lr=1e-2, eval_every=2, eval_batches=2))
    evals = [json.loads(x)["eval"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval" in x]
    assert len(evals) == 2
    seen = [{t for t, v in ev["gate_acc_per_task"].items() if v is not None} for ev in evals]
    assert len(seen[0]) >= 3 and seen[0] == seen[1], seen


def test_overwrite_keeps_the_old_run_when_an_input_is_bad(setup, tmp_path):
    """--overwrite replaces a run only once every input has been read: a missing data folder, a bad --eos-token-id
    or a missing checkpoint leave the old run as it was."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("old\n")
    bad = [dict(data=str(tmp_path / "no-data")), dict(eos_token_id=10**6), dict(checkpoint=str(tmp_path / "none"))]
    for kw in bad:
        with pytest.raises((SystemExit, DataError, FileNotFoundError, ValueError)):
            train(_cfg(setup, run, overwrite=True, **kw))
        assert (run / "metrics.jsonl").read_text() == "old\n", kw
    train(_cfg(setup, run, overwrite=True, steps=1))
    assert (run / "metrics.jsonl").read_text() != "old\n"


def test_eos_token_id_ends_every_sample(setup, tmp_path, monkeypatch):
    from meteora_jax import data as data_lib

    seen = []
    real = data_lib.tokenize

    def spy(samples, tokenizer, *a, **kw):
        out = real(samples, tokenizer, *a, **kw)
        seen.extend(ex.tokens[-1] for ex in out[0])
        return out

    monkeypatch.setattr(data_lib, "tokenize", spy)
    train(_cfg(setup, tmp_path / "run", steps=1, eos_token_id=5, max_len=16, buckets="16"))
    assert seen and all(t == 5 for t in seen)
    with pytest.raises(SystemExit, match="--eos-token-id 10000 is outside"):
        train(_cfg(setup, tmp_path / "run2", steps=1, eos_token_id=10000))


def _run_cli(setup, run_dir, *extra):
    args = [sys.executable, "-m", "meteora_jax.train", "--checkpoint", str(setup / "ckpt"), "--tokenizer",
            str(setup / "tok"), "--data", str(setup / "data"), "--prompt-format", "{prompt}", "--run-dir",
            str(run_dir), "--steps", "60", "--batch-size", "4", "--buckets", "8", "--max-len", "8",
            "--save-every", "5", "--keep", "3", "--eval-every", "0", "--no-progress", "--lr", "1e-2", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["gate_loss"], r["lm_loss"]) for r in rows if "loss" in r}


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_losses(setup, tmp_path):
    full = _run_cli(setup, tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stdout.read()
    victim = _run_cli(setup, tmp_path / "killed")
    marker = tmp_path / "killed" / "checkpoints" / "step_00000010" / "manifest.json"
    deadline = time.time() + 300
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = max(_losses(tmp_path / "killed"))
    assert done < 60
    resumed = _run_cli(setup, tmp_path / "killed", "--resume")
    out = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, out
    assert "resumed from step" in out
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for s in a:
        np.testing.assert_allclose(b[s], a[s], rtol=1e-6, err_msg=f"step {s}")


def test_corrupt_or_partial_checkpoint_falls_back(setup, tmp_path, capsys):
    cfg = _cfg(setup, tmp_path / "run", steps=9, save_every=3, keep=3)
    train(cfg)
    ckpts = TrainCheckpoints(tmp_path / "run" / "checkpoints", keep=3)
    assert ckpts.steps() == [3, 6, 9]
    # corrupt the newest: flip a byte of its largest file
    newest = ckpts.path(9)
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "manifest.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    # make the one before partial: its manifest is missing
    (ckpts.path(6) / "manifest.json").unlink()
    model = checkpoint.load(setup / "ckpt")
    from meteora_jax.train import make_optimizer, trainable_filter

    wrt = trainable_filter("gates")
    opt, _ = make_optimizer(model, cfg, wrt)
    assert ckpts.restore_latest(model, opt, wrt) == 3
    err = capsys.readouterr().out
    assert "step_00000009: corrupt checkpoint" in err and "does not match its sha256" in err
    assert "step_00000006: partial checkpoint" in err


def test_bad_data_messages(setup, tmp_path):
    names = tuple(VOCAB)
    d = tmp_path / "d"
    _write_tasks(d)
    (d / "stranger").mkdir()
    with pytest.raises(DataError, match=r"stranger: task 'stranger' has no matching expert"):
        load_tasks(d, names, "train")
    (d / "stranger").rmdir()
    (d / "metal" / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"metal/train\.jsonl: empty"):
        load_tasks(d, names, "train")
    (d / "metal" / "train.jsonl").write_text('{"prompt": "iron", "response": "tin"}\n{"prompt": "zinc",\n')
    with pytest.raises(DataError, match=r"metal/train\.jsonl:2: not valid JSON"):
        load_tasks(d, names, "train")
    (d / "metal" / "train.jsonl").write_text('{"prompt": "iron", "response": 3}\n')
    with pytest.raises(DataError, match=r"metal/train\.jsonl:1: expected an object"):
        load_tasks(d, names, "train")


def test_overlong_samples_are_counted(setup):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(setup / "tok"))
    samples = load_tasks(setup / "data", tuple(VOCAB), "test", "{prompt}")
    lengths = [len(e.tokens) for e in tokenize(samples, tok, 100)[0]]
    limit = 4
    n_long = sum(n > limit for n in lengths)
    assert n_long > 0
    ex, stats = tokenize(samples, tok, limit, overlong="truncate")
    assert stats["truncated"] == n_long and len(ex) == len(samples) and max(len(e.tokens) for e in ex) == limit
    ex, stats = tokenize(samples, tok, limit, overlong="skip")
    assert stats["skipped"] == n_long and len(ex) == len(samples) - n_long


def test_composite_labels_each_sub_task(setup):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(setup / "tok"))
    samples = load_tasks(setup / "data", tuple(VOCAB), "test", "{prompt}")
    comp = composite(samples, 3, 5, seed=1)
    word_task = {w: i for i, ws in enumerate(VOCAB.values()) for w in ws.split()}
    for s in comp:
        assert len(set(s.tasks)) == 3
        ex, _ = tokenize([s], tok, 100)
        words = tok.convert_ids_to_tokens(ex[0].tokens.tolist())
        known = [(w, t) for w, t in zip(words, ex[0].task_ids, strict=True) if w in word_task]
        assert len(known) >= 3 * 5  # the numbering ("1.") is <unk> to this tokenizer; the words are known
        for w, t in known:
            assert t == word_task[w], (w, t)  # every word carries the task it came from
    assert composite(samples, 3, 5, seed=1) == comp  # seeded


def test_composite_mix_adds_seeded_composites_of_each_size(setup, tmp_path, capsys):
    from meteora_jax.train import composite_samples

    singles = load_tasks(setup / "data", tuple(VOCAB), "train", "{prompt}")
    cfg = _cfg(setup, tmp_path / "run", composite_mix=0.25, composite_sizes="3,2")
    comp = composite_samples(singles, cfg)
    assert len(comp) == round(0.25 * len(singles))
    sizes = [len(s.segments) // 3 for s in comp]  # restate: n questions, then n (question, answer) pairs
    assert all(len(s.segments) % 3 == 0 for s in comp) and sorted(set(sizes)) == [2, 3]
    assert abs(sizes.count(2) - sizes.count(3)) <= 1
    for s in comp:
        n = len(s.segments) // 3
        assert len(set(s.tasks)) == n and [r for _, _, r in s.segments] == [False] * (n + 1) + [True, False] * (
            n - 1) + [True]
    assert composite_samples(singles, cfg) == comp  # seeded
    assert composite_samples(singles, _cfg(setup, tmp_path / "r", composite_mix=0.25, seed=1)) != comp
    assert composite_samples(singles, _cfg(setup, tmp_path / "r", composite_mix=0)) == []
    answers = composite_samples(singles, _cfg(setup, tmp_path / "r", composite_mix=0.1, composite_layout="answers"))
    assert all([r for _, _, r in s.segments] == [False] * (len(s.segments) // 2) + [True] * (len(s.segments) // 2)
               for s in answers)
    for kw, msg in [(dict(composite_mix=-1), "--composite-mix must be >= 0"),
                    (dict(composite_mix=0.1, composite_sizes="1,2"), "--composite-sizes: expected"),
                    (dict(composite_mix=0.1, composite_sizes="x"), "--composite-sizes: expected"),
                    (dict(composite_mix=0.1, composite_sizes="5"), "--composite-sizes 5: composite-5 needs samples "
                                                                   "of at least 5 tasks, got 4"),
                    (dict(composite_mix=0.1, composite_layout="free"), "--composite-layout must be one of")]:
        with pytest.raises(SystemExit, match=msg):
            composite_samples(singles, _cfg(setup, tmp_path / "r", **kw))
    # a run with the mix trains on them (its batches hold sequences longer than any single sample)
    capsys.readouterr()
    out = train(_cfg(setup, tmp_path / "mixed", composite_mix=0.5, steps=2, max_len=64, buckets="8,64"))
    assert "composite samples (n in [2, 3], layout restate) added" in capsys.readouterr().out
    assert Path(out["final_checkpoint"]).exists()


def test_resume_a_run_saved_before_an_option_existed(setup, tmp_path):
    """A config.json without a newer option (here the composite ones) resumes when that option keeps its default,
    and refuses when it is changed."""
    run = tmp_path / "run"
    train(_cfg(setup, run, steps=2))
    saved = json.loads((run / "config.json").read_text())
    for k in ("composite_mix", "composite_sizes", "composite_layout"):
        del saved[k]
    (run / "config.json").write_text(json.dumps(saved))
    out = train(_cfg(setup, run, steps=3, resume=True))
    assert out["last"]["step"] == 3
    with pytest.raises(SystemExit, match="composite_mix"):
        train(_cfg(setup, run, steps=4, resume=True, composite_mix=0.5))


def test_jax_is_deterministic_here():
    # the resume test relies on identical steps giving identical numbers on this backend
    x = jax.random.normal(jax.random.key(0), (64, 64))
    assert np.array_equal(np.asarray(x @ x), np.asarray(x @ x))


def test_remat_gives_the_same_gradients(setup):
    from meteora_jax.losses import meteora_loss
    from meteora_jax.meteora import GateParam

    model = checkpoint.load(setup / "ckpt")
    rng = np.random.default_rng(5)
    b, t = 2, 6
    batch = {"tokens": jax.numpy.asarray(rng.integers(2, model.config.vocab_size, (b, t)), jax.numpy.int32),
             "attention_mask": jax.numpy.ones((b, t), bool),
             "task_ids": jax.numpy.asarray(rng.integers(0, 4, (b, t)), jax.numpy.int32),
             "response": jax.numpy.ones((b, t), bool)}
    grads = {}
    for remat in (False, True):
        model.remat = remat
        fn = nnx.grad(lambda m: meteora_loss(m, batch, gate_coef=1.0, response_only=False)[0],
                      argnums=nnx.DiffState(0, GateParam))
        grads[remat] = jax.tree.leaves(nnx.jit(fn)(model))
    assert len(grads[True]) == len(grads[False]) > 0
    for a, g in zip(grads[False], grads[True], strict=True):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(a), rtol=1e-5, atol=1e-7)
