"""Evaluation: metrics against hand-checked cases and float64 formulas (BLEU, ROUGE-L LCS) and against sacrebleu /
rouge-score themselves, composite parsing, routing accuracy on random arrays, and `python -m meteora_jax.evaluate`
end to end on a tiny random MeteoRA model (answers and routing recomputed one prompt at a time)."""

import json
import math
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteora_jax import checkpoint, evaluate, metrics
from meteora_jax import data as data_lib
from meteora_jax.config import LlamaConfig
from meteora_jax.meteora import MeteoraConfig, MeteoraLlama, set_routing


# ------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("mode, pred, refs, want", [
    ("exact", "  Five  apples ", ["Five apples"], True),
    ("exact", "five apples", ["Five apples"], False),
    ("exact_ci", "FIVE apples.", ["five apples"], True),
    ("exact_ci", "five apples and a pear", ["five apples"], False),
    ("exact_ci", "5", ["five", "5"], True),
    ("contains", "I think it is Lorentz's Law, yes", ["lorentz's law"], True),
    ("contains", "Lorentz", ["Lorentz's Law"], False),
    ("first_word", "No, because frost melts.", ["No. Skiing needs snow."], True),
    ("first_word", "Nope.", ["No. Skiing needs snow."], False),
    ("first_word", "", ["No."], False),
])
def test_accuracy_modes(mode, pred, refs, want):
    assert metrics.is_correct(pred, refs, mode) is want


@pytest.mark.parametrize("pred, want", [
    ("correct", "correct"), ("The reasoning is incorrect.", "incorrect"), ("Incorrect", "incorrect"),
    ("correct or incorrect", "incorrect"),  # "correct" only occurs inside "incorrect"
])
def test_choice_mode_prefers_the_longer_choice(pred, want):
    assert metrics.matched_choice(pred, ["correct", "incorrect"]) == want


def test_choice_mode():
    digits = [str(i) for i in range(10)]
    assert metrics.is_correct("3", ["3"], "choice", digits)
    assert not metrics.is_correct("13", ["3"], "choice", digits)  # names two choices: no answer
    assert not metrics.is_correct("The owl or the crow", ["The owl"], "choice", ["The owl", "The crow"])
    assert metrics.is_correct("I pick: the owl.", ["The owl"], "choice", ["The owl", "The crow"])
    assert not metrics.is_correct("nothing", ["The owl"], "choice", ["The owl", "The crow"])
    assert metrics.accuracy(["a", "b", "c", "a"], [["a"], ["a"], ["c"], ["b"]], "choice", [["a", "b", "c"]] * 4) == 0.5
    with pytest.raises(ValueError, match="needs the example's choices"):
        metrics.is_correct("a", ["a"], "choice")
    with pytest.raises(ValueError, match="accuracy mode must be one of"):
        metrics.is_correct("a", ["a"], "fuzzy")
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        metrics.accuracy(["a", "b"], [["a"]], "exact")


# ------------------------------------------------------------------------------------------ BLEU / ROUGE
def _bleu_float64(preds, refs):
    """Corpus BLEU-4 (whitespace tokens, no smoothing: all n-gram precisions must be > 0), as in Papineni et al."""
    match, total = np.zeros(4), np.zeros(4)
    hyp_len = ref_len = 0
    for p, rs in zip(preds, refs, strict=True):
        pt, rts = p.split(), [r.split() for r in rs]
        hyp_len += len(pt)
        ref_len += min((abs(len(r) - len(pt)), len(r)) for r in rts)[1]
        for n in range(1, 5):
            grams = Counter(tuple(pt[i:i + n]) for i in range(len(pt) - n + 1))
            best = Counter()
            for r in rts:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            total[n - 1] += max(len(pt) - n + 1, 0)
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(np.mean(np.log(match / total)))


def test_bleu_against_formula_and_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    preds = ["the cat sat on the mat today", "a quick brown fox jumps over the lazy dog", "we like green tea a lot"]
    refs = [["the cat sat on a mat today"], ["the quick brown fox jumped over the lazy dog", "a quick brown fox jumps"],
            ["we really like green tea a lot", "green tea is what we like"]]
    got = metrics.bleu(preds, refs)
    np.testing.assert_allclose(got, _bleu_float64(preds, refs), rtol=1e-9)
    single = [[r[0]] for r in refs]
    np.testing.assert_allclose(metrics.bleu(preds, single),
                               sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]]).score, rtol=1e-12)
    assert metrics.bleu(preds, [[p] for p in preds]) == pytest.approx(100.0)
    assert metrics.bleu([], []) == 0.0


def _lcs(a, b):
    t = np.zeros((len(a) + 1, len(b) + 1), int)
    for i in range(len(a)):
        for j in range(len(b)):
            t[i + 1, j + 1] = t[i, j] + 1 if a[i] == b[j] else max(t[i, j + 1], t[i + 1, j])
    return t[-1, -1]


def test_rouge_l_against_lcs_and_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    preds = ["the cat sat down", "green tea is good", "zebra"]
    refs = [["the cat was sat down"], ["tea is very good", "green tea is what we like"], ["horse"]]
    want = []
    for p, rs in zip(preds, refs, strict=True):
        best = 0.0
        for r in rs:
            lcs = _lcs(p.split(), r.split())
            prec, rec = lcs / len(p.split()), lcs / len(r.split())
            best = max(best, 0.0 if lcs == 0 else 2 * prec * rec / (prec + rec))
        want.append(best)
    assert metrics.rouge_l(preds, refs) == pytest.approx(np.mean(want), rel=1e-12)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert metrics.rouge_l(["cats running fast"], [["the cat runs fast"]]) == pytest.approx(
        scorer.score("the cat runs fast", "cats running fast")["rougeL"].fmeasure)


def test_score_dispatch():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    s = metrics.score(["yes it is", "", "no"], [["Yes."], ["no"], ["No, never"]],
                      {"metrics": ["accuracy", "bleu", "rougeL"], "accuracy": "first_word"})
    assert s["n"] == 3 and s["empty"] == 1 and s["accuracy"] == pytest.approx(2 / 3)
    assert set(s) == {"n", "empty", "accuracy", "bleu", "rougeL"}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score(["a"], [["a"]], {"metrics": ["meteor"]})


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_numbered():
    text = "1. The owl is first.\n2. No. It has 2. legs\n  3) five\nextra line\n4. x"
    assert metrics.parse_numbered(text, 3) == ["The owl is first.", "No. It has 2. legs", "five"]
    assert metrics.parse_numbered(text, 3, first_line=False)[2] == "five\nextra line\n4. x"
    assert metrics.parse_numbered("2. b\n1. a\n3. c", 3) == ["a", "", ""]  # markers taken in order only
    assert metrics.parse_numbered("1. a\n3. c", 3) == ["a\n3. c".split("\n")[0], "", ""]
    assert metrics.parse_numbered("no numbers", 2) == ["", ""]
    many = "\n".join(f"{k}. answer {k}" for k in range(1, 11))
    assert metrics.parse_numbered(many, 10) == [f"answer {k}" for k in range(1, 11)]
    assert metrics.parse_numbered("1.\n2. b", 2) == ["", "b"]


# ---------------------------------------------------------------------------------------------- routing
def test_routing_hits_and_tally():
    rng = np.random.default_rng(0)
    b, t, layers, mods, k, e = 3, 7, 4, 5, 2, 4
    experts = rng.integers(0, e, size=(b, t, layers, mods, k))
    labels = rng.integers(-1, e, size=(b, t))
    hits = metrics.token_routing_hits(experts, labels)
    tally = metrics.RoutingTally(e)
    tally.add(hits[:2], labels[:2])
    tally.add(hits[2:], labels[2:])
    res = tally.result([f"t{i}" for i in range(e)])
    for task in range(e):
        vals = []
        for i in range(b):
            for j in range(t):
                if labels[i, j] == task:
                    vals.append(sum(experts[i, j, l_, m, 0] == task for l_ in range(layers) for m in range(mods))
                                / (layers * mods))
        want = np.mean(vals) if vals else None
        got = res["per_task"][f"t{task}"]
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)
        assert res["tokens"][f"t{task}"] == len(vals)
    assert np.isnan(hits[labels < 0]).all()
    with pytest.raises(ValueError, match="must be labels"):
        metrics.token_routing_hits(experts[..., 0], labels)


def test_dominant_hits():
    rng = np.random.default_rng()
    b, t, layers, mods, k, e = 3, 9, 4, 5, 2, 6
    experts = np.stack([np.stack([rng.choice(e, size=k, replace=False) for _ in range(b * t * layers * mods)])])
    experts = experts.reshape(b, t, layers, mods, k)
    weights = rng.random((b, t, layers, mods, k))
    labels = rng.integers(-1, e, size=(b, t))
    labels[0, 0] = experts[0, 0, 0, 0, 0]  # one token routed everywhere to its own label, with all the weight
    experts[0, 0, ..., 0], weights[0, 0, ..., 0], weights[0, 0, ..., 1] = labels[0, 0], 1.0, 0.0
    got = metrics.token_dominant_hits(experts, weights, labels, e)
    for i in range(b):
        for j in range(t):
            mass = [sum(weights[i, j, l_, m, s] for l_ in range(layers) for m in range(mods) for s in range(k)
                        if experts[i, j, l_, m, s] == x) for x in range(e)]
            want = np.nan if labels[i, j] < 0 else float(int(np.argmax(mass)) == labels[i, j])
            assert (np.isnan(got[i, j]) and np.isnan(want)) or got[i, j] == want
    assert got[0, 0] == 1.0
    with pytest.raises(ValueError, match="must both be labels"):
        metrics.token_dominant_hits(experts, weights[..., :1], labels, e)


# ------------------------------------------------------------------------------------ end to end (CLI)
WORDS = {"colour": "red blue green pink grey gold teal cyan", "digits": "one two three four five six seven eight"}


def _rows(rng, task, n):
    """`colour`: multiple choice among its first four words; `digits`: a free two-word answer."""
    w = WORDS[task].split()
    if task == "colour":
        return [{"prompt": " ".join(rng.choice(w, size=3)), "response": str(rng.choice(w[:4])), "choices": w[:4]}
                for _ in range(n)]
    return [{"prompt": " ".join(rng.choice(w, size=4)), "response": " ".join(rng.choice(w, size=2))}
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Task folders (+ tasks.json, a composite-2 file), a byte-level BPE tokenizer, a random MeteoRA checkpoint."""
    from meteora_jax.demo import build_tokenizer

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    test = {}
    for task in WORDS:
        (root / "data" / task).mkdir(parents=True)
        for split in ("train", "test"):
            rows = _rows(rng, task, 4)
            (root / "data" / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        test[task] = rows
    (root / "data" / "tasks.json").write_text(json.dumps({"tasks": {
        "colour": {"metrics": ["accuracy"], "accuracy": "choice", "primary": "accuracy"},
        "digits": {"metrics": ["accuracy"], "accuracy": "contains", "primary": "accuracy"}}}))
    tok = build_tokenizer(root / "tok", root / "data")
    names = ("colour", "digits")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = MeteoraLlama(cfg, MeteoraConfig(expert_names=names, rank=4, top_k=2, temperature=2.0),
                         rngs=nnx.Rngs(1))
    # the first two test answers of each task become what the model says (at the 6-token cap the tests use), so
    # accuracy is known to be at least 1/2 and not trivially 0
    for task in WORDS:
        for r in test[task][:2]:
            r["response"] = _answer_alone(model, tok, _prompt(tok, r["prompt"]), 6)
            assert r["response"]
            if task == "colour":
                r["choices"] = [r["response"], *[c for c in r["choices"] if c != r["response"]]]
        (root / "data" / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test[task]))
    comp = []
    for i in range(2):
        a, b = test["colour"][i], test["digits"][i]
        segs = [[f"1. [INST] {a['prompt']} [/INST]", "colour", False], [f"\n2. [INST] {b['prompt']} [/INST]", "digits",
                                                                         False],
                [f"1. {a['response']}", "colour", True], [f"\n2. {b['response']}", "digits", True]]
        comp.append({"segments": segs, "tasks": list(names), "references": [[a["response"]], [b["response"]]],
                     "choices": [a["choices"], None]})
    (root / "composite_2.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comp))
    checkpoint.save(root / "ckpt", model)
    return root, tok, names, test


def _answer_alone(model, tok, ids, budget, one_line=False):
    from meteora_jax import generate as gen

    toks = gen.generate(model, [ids], max_new_tokens=budget, eos_token_ids=[tok.eos_token_id]).tokens[0]
    text = tok.decode(toks, skip_special_tokens=True)
    return (text.split("\n", 1)[0] if one_line else text).strip()


def _prompt(tok, text):  # BOS + "[INST] ... [/INST]", as training tokenizes it
    return [tok.bos_token_id] + tok(f"[INST] {text} [/INST]", add_special_tokens=False)["input_ids"]


def test_cli_end_to_end(tiny):
    root, tok, names, test = tiny
    out = root / "auto.json"
    rc = evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data",
                        str(root / "data"), "--composite", str(root / "composite_2.jsonl"), "--batch-size", "3",
                        "--max-new-tokens", "6", "--composite-temperature", "2=5", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    model = checkpoint.load(root / "ckpt")
    for t, task in enumerate(names):
        s = res["tasks"][task]
        refs = [[r["response"]] for r in test[task]]
        budget = max(len(tok(" " + r[0], add_special_tokens=False)["input_ids"]) for r in refs)
        assert s["max_new_tokens"] == min(6, math.ceil(1.25 * (budget + 1)) + 4)
        preds = [p["prediction"] for p in res["predictions"]["tasks"][task]]
        alone = [_answer_alone(model, tok, _prompt(tok, r["prompt"]), s["max_new_tokens"]) for r in test[task]]
        assert preds == alone  # batched across tasks and cut per row == one prompt at a time
        mode = {"colour": "choice", "digits": "contains"}[task]
        assert s["accuracy"] == metrics.accuracy(alone, refs, mode, [r.get("choices") for r in test[task]]) >= 0.5
        # routing accuracy, recomputed from the model's own routing on one right-padded batch, labels by hand
        seqs = [_prompt(tok, r["prompt"]) + tok(" " + r["response"], add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id] for r in test[task]]
        width = max(map(len, seqs))
        ids = np.array([q + [0] * (width - len(q)) for q in seqs])
        mask = np.array([[1] * len(q) + [0] * (width - len(q)) for q in seqs], bool)
        aux = model(jnp.asarray(ids), jnp.asarray(mask)).aux
        top1 = np.stack([np.asarray(aux[m].experts[..., 0]) for m in aux])  # [M, L, B, T]
        hit = (top1 == t).mean(axis=(0, 1))  # [B, T]
        vals = [hit[i, j] for i, q in enumerate(seqs) for j in range(1, len(q))]  # BOS carries no task
        assert res["routing"]["all"]["per_task"][task] == pytest.approx(np.mean(vals), rel=1e-6)
        mass = np.zeros((*ids.shape, len(names)))  # dominant expert: most routing weight over all gates
        for m in aux:
            ex, wt = np.asarray(aux[m].experts), np.asarray(aux[m].weights)  # [L, B, T, k]
            for x in range(len(names)):
                mass[..., x] += np.where(ex == x, wt, 0.0).sum(axis=(0, -1))
        dom = [float(mass[i, j].argmax() == t) for i, q in enumerate(seqs) for j in range(1, len(q))]
        assert res["routing"]["dominant"]["per_task"][task] == pytest.approx(np.mean(dom), rel=1e-6)
    c = res["composite"]["composite_2"]
    assert c["temperature"] == 5.0 and c["n"] == 2 and c["per_task"]["colour"]["n"] == 2
    set_routing(model, temperature=5.0)
    for row, pred in zip(test["colour"][:2], res["predictions"]["composite_2"], strict=True):
        assert pred["answers"] == metrics.parse_numbered(pred["text"], 2) and "\n" not in pred["answers"][0]
        ids = _prompt(tok, row["prompt"])
        digits = test["digits"][test["colour"].index(row)]
        ids = [tok.bos_token_id] + tok(f"1. [INST] {row['prompt']} [/INST]", add_special_tokens=False)["input_ids"] \
            + tok(f"\n2. [INST] {digits['prompt']} [/INST]", add_special_tokens=False)["input_ids"] \
            + tok("1.", add_special_tokens=False)["input_ids"]
        longest = max(len(tok(" " + r["response"], add_special_tokens=False)["input_ids"]) for r in test["colour"][:2])
        budget = min(6, math.ceil(1.25 * (longest + 1)) + 4)
        assert pred["answers"][0] == _answer_alone(model, tok, ids, budget, one_line=True)
    assert c["routing"]["all"]["tokens"]["colour"] > 0


def test_cli_oracle_forces_each_tasks_expert(tiny):
    root, tok, names, test = tiny
    out = root / "oracle.json"
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data",
                          str(root / "data"), "--tasks", "digits", "--oracle", "--max-new-tokens", "5", "--out",
                          str(out)]) == 0
    res = json.loads(out.read_text())
    model = set_routing(checkpoint.load(root / "ckpt"), forced_expert=1)
    alone = [_answer_alone(model, tok, _prompt(tok, r["prompt"]), res["tasks"]["digits"]["max_new_tokens"])
             for r in test["digits"]]
    assert [p["prediction"] for p in res["predictions"]["tasks"]["digits"]] == alone
    assert res["routing"] is None and list(res["tasks"]) == ["digits"]


def test_cli_eos_token_id_replaces_the_tokenizers(tiny, tmp_path):
    """--eos-token-id N: answers stop at N (or the config's EOS), as generating alone with those stop ids does."""
    from meteora_jax import generate as gen

    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    ids0 = _prompt(tok, test["digits"][0]["prompt"])
    first = gen.generate(model, [ids0], max_new_tokens=6, eos_token_ids=[tok.eos_token_id]).tokens[0]
    assert len(first) >= 2 and first[1] != tok.eos_token_id
    new = int(first[1])  # a token the model says early: the answer to prompt 0 ends there
    out = tmp_path / "eos.json"
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data",
                          str(root / "data"), "--tasks", "digits", "--max-new-tokens", "6", "--eos-token-id",
                          str(new), "--no-routing-accuracy", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["protocol"]["eos_token_id"] == new and new in res["protocol"]["stop_token_ids"]
    budget = res["tasks"]["digits"]["max_new_tokens"]
    stops = [new, *gen.default_eos(model)]
    want = [tok.decode(gen.generate(model, [_prompt(tok, r["prompt"])], max_new_tokens=budget,
                                    eos_token_ids=stops).tokens[0], skip_special_tokens=True).strip()
            for r in test["digits"]]
    assert [p["prediction"] for p in res["predictions"]["tasks"]["digits"]] == want
    assert want[0] == tok.decode(first[:2], skip_special_tokens=True).strip()
    with pytest.raises(SystemExit, match="--eos-token-id 99999 is outside"):
        evaluate.main(["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data",
                       str(root / "data"), "--eos-token-id", "99999", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_cli_errors(tiny, tmp_path, capsys):
    root, *_ = tiny
    base = ["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data", str(root / "data")]
    (tmp_path / "exists.json").write_text("{}")
    cases = [
        (["--out", str(tmp_path / "exists.json")], "already exists"),
        (["--out", str(tmp_path / "o.json"), "--composite-temperature", "3:15"], "expected N=T pairs"),
        (["--out", str(tmp_path / "o.json"), "--oracle", "--composite", str(root / "composite_2.jsonl"),
          "--composite-mode", "free"], "--oracle on --composite answers one sub-question at a time"),
        (["--out", str(tmp_path / "o.json"), "--oracle", "--forced-expert", "0"], "not with --forced-expert"),
        (["--out", str(tmp_path / "o.json"), "--tasks", "nope"], r"no folder for task\(s\) \['nope'\]"),
        (["--out", str(tmp_path / "o.json"), "--forced-expert", "nope"], "not an expert name or index"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            evaluate.main(base + extra)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"segments": [["a", "colour", false]], "references": [], "choices": []}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: expected a composite line"):
        evaluate.main(base + ["--out", str(tmp_path / "o.json"), "--composite", str(bad)])
    (tmp_path / "d" / "x").mkdir(parents=True)
    (tmp_path / "d" / "x" / "test.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "d" / "tasks.json").write_text(json.dumps({"tasks": {"x": {"accuracy": "fuzzy"}}}))
    with pytest.raises(data_lib.DataError, match="unknown metrics .* or accuracy mode 'fuzzy'"):
        evaluate.load_specs(tmp_path / "d")
    assert not (tmp_path / "o.json").exists()


def test_encode_matches_training_tokenization(tiny):
    root, tok, names, test = tiny
    row = test["digits"][0]
    ex = evaluate.encode([evaluate.single_sample(row, 1)], tok)[0]
    want = _prompt(tok, row["prompt"])
    assert evaluate.prompt_ids([ex])[0] == want
    assert ex.tokens.tolist() == want + tok(" " + row["response"], add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]
    assert Path(root / "tok").is_dir()


def test_answer_cap_shares_one_program_across_budgets(tiny):
    """With `max_new_cap`, calls with different budgets (and one over the cap) reuse one compiled decode per prompt
    bucket, and each answer still equals generating it alone with its own budget."""
    from meteora_jax import generate as gen

    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    answer = evaluate.Answerer(model, tok, 4, max_new_cap=16)
    ids = [_prompt(tok, r["prompt"]) for r in test["digits"]]
    assert len({gen.bucket(len(i)) for i in ids}) == 1
    got = {b: answer(ids, b) for b in (16, 1, 5)}  # the first call compiles
    size = gen._decode._cache_size()
    for b in (2, 3, 12):
        got[b] = answer(ids, b)
    assert gen._decode._cache_size() == size
    got[17] = answer(ids, 17)  # over the cap: a larger buffer, compiled once more
    assert gen._decode._cache_size() == size + 1
    for b, texts in got.items():
        assert texts == [_answer_alone(model, tok, i, b) for i in ids], b


def test_free_composite_is_one_generation_parsed(tiny):
    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    rows = evaluate.read_composite(root / "composite_2.jsonl")
    scores, preds, _ = evaluate.evaluate_composite(evaluate.Answerer(model, tok, 4), rows, {}, names, 6, mode="free")
    for i, p in enumerate(preds):
        ids = [tok.bos_token_id] + tok(f"1. [INST] {test['colour'][i]['prompt']} [/INST]",
                                       add_special_tokens=False)["input_ids"] \
            + tok(f"\n2. [INST] {test['digits'][i]['prompt']} [/INST]", add_special_tokens=False)["input_ids"]
        text = _answer_alone(model, tok, ids, 12)  # min(cap x n, sum of the sub-task budgets + 4 each)
        assert p["text"] == text and p["answers"] == metrics.parse_numbered(text, 2)
    assert scores["mode"] == "free" and scores["per_task"]["digits"]["n"] == 2
    with pytest.raises(ValueError, match="composite mode must be one of"):
        evaluate.evaluate_composite(evaluate.Answerer(model, tok, 4), rows, {}, names, 6, mode="both")


def test_restate_composite_asks_each_sub_question_again(tiny):
    """Each step appends "\\nk. [INST] question k [/INST]" after the whole prompt and the earlier answers, and
    generates one line: the same answers as building those contexts by hand and answering each alone."""
    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    rows = evaluate.read_composite(root / "composite_2.jsonl")
    scores, preds, finals = evaluate.evaluate_composite(evaluate.Answerer(model, tok, 4), rows, {}, names, 6,
                                                        mode="restate")
    assert scores["mode"] == "restate" and scores["per_task"]["colour"]["n"] == len(rows)
    budgets = {}
    for task in ("colour", "digits"):
        refs = [r["references"][["colour", "digits"].index(task)] for r in rows]
        budgets[task] = evaluate.answer_budget(tok, refs, 6)
    for i, p in enumerate(preds):
        qs = [f"1. [INST] {test['colour'][i]['prompt']} [/INST]", f"2. [INST] {test['digits'][i]['prompt']} [/INST]"]
        ids = [tok.bos_token_id] + tok(qs[0], add_special_tokens=False)["input_ids"] \
            + tok("\n" + qs[1], add_special_tokens=False)["input_ids"]
        want = []
        for k, task in enumerate(("colour", "digits")):
            ids = ids + tok("\n" + qs[k], add_special_tokens=False)["input_ids"]
            got = _answer_alone(model, tok, ids, budgets[task], one_line=True)
            want.append(got)
            if got:
                ids = ids + tok(" " + got, add_special_tokens=False)["input_ids"]
        assert p["answers"] == want, i
        assert finals[i] == ids
    assert any(any(a) for a in (p["answers"] for p in preds))  # answers were generated at all


def test_composite_oracle_forces_each_sub_questions_expert(tiny):
    """`oracle=True`: answer k of each sample is what the model says with that sub-task's expert forced, in the
    restate context built from the oracle's own earlier answers; samples whose k-th sub-tasks differ are answered
    with different experts in the same step. The routing is automatic again afterwards."""
    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    rows = evaluate.read_composite(root / "composite_2.jsonl")
    a, b = test["digits"][2], test["colour"][2]  # a third sample, sub-tasks in the other order
    segs = [(f"1. [INST] {a['prompt']} [/INST]", "digits", False), (f"\n2. [INST] {b['prompt']} [/INST]", "colour",
                                                                     False)]
    rows.append({"segments": segs, "references": [[a["response"]], [b["response"]]], "choices": [None, b["choices"]],
                 "sub_tasks": ["digits", "colour"]})
    answer = evaluate.Answerer(model, tok, 4)
    scores, preds, finals = evaluate.evaluate_composite(answer, rows, {}, names, 6, mode="restate", oracle=True)
    assert scores["oracle"] and model.meteora_config.forced_expert is None
    budgets = {}
    for task in names:
        refs = [r["references"][r["sub_tasks"].index(task)] for r in rows]
        budgets[task] = evaluate.answer_budget(tok, refs, 6)
    differs = 0
    for r, p, f in zip(rows, preds, finals, strict=True):
        qs = [t.strip() for t, _, _ in r["segments"]]
        ids = [tok.bos_token_id] + tok(qs[0], add_special_tokens=False)["input_ids"] \
            + tok("\n" + qs[1], add_special_tokens=False)["input_ids"]
        want = []
        for k, task in enumerate(r["sub_tasks"]):
            ids = ids + tok("\n" + qs[k], add_special_tokens=False)["input_ids"]
            got = _answer_alone(set_routing(model, forced_expert=names.index(task)), tok, ids, budgets[task],
                                one_line=True)
            auto = _answer_alone(set_routing(model, forced_expert=None), tok, ids, budgets[task], one_line=True)
            differs += got != auto
            want.append(got)
            if got:
                ids = ids + tok(" " + got, add_special_tokens=False)["input_ids"]
        assert p["answers"] == want and f == ids
    assert differs  # forcing the expert changed some answer: the check above can tell the two apart
    with pytest.raises(ValueError, match="one sub-question at a time"):
        evaluate.evaluate_composite(answer, rows, {}, names, 6, mode="free", oracle=True)
    with pytest.raises(ValueError, match=r"sub-tasks \['digits'\] have no expert"):
        evaluate.evaluate_composite(answer, rows, {}, ("colour", "other"), 6, mode="restate", oracle=True)


def test_restate_training_layout_is_the_restate_evaluation_context(tiny):
    """`data.composite(layout="restate")` (what `train --composite-mix` adds) tokenizes to exactly the context
    `evaluate --composite-mode restate` builds when each answer is the reference, and labels each sub-question's
    restated question and answer with its own task."""
    root, tok, names, test = tiny
    samples = data_lib.load_tasks(root / "data", names, "test")
    for n_seed in range(3):
        restate = data_lib.composite(samples, 2, 4, seed=n_seed, layout="restate")
        listed = data_lib.composite(samples, 2, 4, seed=n_seed)  # same draws, the evaluation file's layout
        rows = [{"segments": [(t, names[i], r) for t, i, r in s.segments], "references": [[""], [""]],
                 "choices": [None, None], "sub_tasks": [names[i] for _, i, r in s.segments if not r]}
                for s in listed]
        answers = [[a.strip() for a, _, r in s.segments if r] for s in restate]

        class Reference:  # answers each sub-question with its reference answer
            def __init__(self, answers):
                self.tok, self.k, self.answers = tok, 0, answers

            def __call__(self, prompts, budgets, one_line=False, experts=None):
                assert one_line and experts is None and len(prompts) == len(self.answers)
                self.k += 1
                return [a[self.k - 1] for a in self.answers]

        _, preds, finals = evaluate.evaluate_composite(Reference(answers), rows, {}, names, 6, mode="restate")
        assert [p["answers"] for p in preds] == answers
        examples, _ = data_lib.tokenize(restate, tok, 10 ** 6)
        for ex, f, s in zip(examples, finals, restate, strict=True):
            assert ex.tokens[-1] == tok.eos_token_id and ex.tokens[:-1].tolist() == f
            assert [r for _, _, r in s.segments] == [False, False, False, True, False, True]
            tasks = [i for _, i, _ in s.segments]
            assert tasks[2:4] == [tasks[0]] * 2 and tasks[4:] == [tasks[1]] * 2 and tasks[0] != tasks[1]
            # each answer token carries its sub-question's task
            labels = ex.task_ids[ex.response]
            assert set(labels[:-1].tolist()) == {tasks[0], tasks[1]} and labels[-1] == tasks[1]
    with pytest.raises(ValueError, match="composite layout must be one of"):
        data_lib.composite(samples, 2, 1, seed=0, layout="both")


def test_min_new_tokens_makes_every_answer_start(tiny):
    """An answer whose first token would be EOS is empty; with min_new_tokens it is the generation with EOS masked
    for those tokens (generate's rule, checked against transformers in test_generate)."""
    from meteora_jax import generate as gen

    root, tok, names, test = tiny
    model = checkpoint.load(root / "ckpt")
    ids = [_prompt(tok, r["prompt"]) for r in test["digits"]]
    firsts = [gen.generate(model, [i], max_new_tokens=1, eos_token_ids=[]).tokens[0][0] for i in ids]
    for m in (0, 1, 3):
        answer = evaluate.Answerer(model, tok, 4, min_new_tokens=m)
        answer.eos = sorted({*answer.eos, firsts[0]})  # the first prompt's first token now ends it
        got = answer(ids, 6)
        for i, text in zip(ids, got, strict=True):
            toks = gen.generate(model, [i], max_new_tokens=6, eos_token_ids=answer.eos, min_new_tokens=m).tokens[0]
            assert text == tok.decode(toks, skip_special_tokens=True).strip()
            assert not set(answer.eos) & set(toks[:m])
        if m == 0:  # stopped at once
            assert got[0] == tok.decode([firsts[0]], skip_special_tokens=True).strip()


def test_cli_no_single_scores_only_the_composite_files(tiny):
    root, tok, names, test = tiny
    out = root / "composite_only.json"
    common = ["--checkpoint", str(root / "ckpt"), "--tokenizer", str(root / "tok"), "--data", str(root / "data"),
              "--max-new-tokens", "6", "--no-single", "--no-routing-accuracy"]
    assert evaluate.main([*common, "--composite", str(root / "composite_2.jsonl"), "--composite-mode", "restate",
                          "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"] == {} and "tasks" not in res["predictions"] and "average" not in res
    c = res["composite"]["composite_2"]
    assert c["mode"] == "restate" and c["per_task"]["digits"]["n"] == len(evaluate.read_composite(
        root / "composite_2.jsonl"))
    with pytest.raises(SystemExit, match="--no-single evaluates only --composite files"):
        evaluate.main([*common, "--out", str(root / "none.json")])
    assert not (root / "none.json").exists()
    oracle = root / "composite_oracle.json"
    assert evaluate.main([*common, "--composite", str(root / "composite_2.jsonl"), "--composite-mode", "restate",
                          "--oracle", "--out", str(oracle)]) == 0
    res = json.loads(oracle.read_text())
    assert res["protocol"]["oracle"] and res["composite"]["composite_2"]["oracle"]
    model = checkpoint.load(root / "ckpt")
    _, want, _ = evaluate.evaluate_composite(evaluate.Answerer(model, tok, 8), evaluate.read_composite(
        root / "composite_2.jsonl"), {}, names, 6, mode="restate", oracle=True)
    assert [p["answers"] for p in res["predictions"]["composite_2"]] == [p["answers"] for p in want]
