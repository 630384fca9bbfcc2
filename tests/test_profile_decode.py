"""experiments/profile_decode.py's step summary against a brute-force recomputation on random intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "profile_decode.py"


def load():
    spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_busy_span_and_top_kernels():
    prof = load()
    rng = np.random.default_rng()
    names = ["gemm", "reduce", "shrink", "expand", "memset"]
    events = []
    for _ in range(300):  # integer ns on two streams, overlapping at random
        start = int(rng.integers(0, 5000))
        events.append((f"Stream #{rng.integers(2)}", names[rng.integers(len(names))], float(start),
                       float(start + rng.integers(0, 60))))
    long_start = int(rng.integers(4800, 4900))  # a long kernel still running when the last one starts (and ends)
    events.append(("Stream #0", "gemm", float(long_start), float(long_start + rng.integers(500, 900))))
    events.append(("Stream #1", "memset", 5100.0, 5101.0 + rng.integers(5)))
    steps = 7
    got = prof.summarise(events, steps, top=3)

    grid = np.zeros(6000, bool)  # busy nanoseconds
    for _, _, s, e in events:
        grid[int(s):int(e)] = True
    lo, hi = min(s for *_, s, _ in events), max(e for *_, e in events)
    assert abs(got["busy_ms_per_step"] - grid.sum() / steps / 1e6) < 1e-12
    assert abs(got["span_ms_per_step"] - (hi - lo) / steps / 1e6) < 1e-12
    assert abs(got["idle_share"] - (1 - grid.sum() / (hi - lo))) < 1e-9
    assert got["events_per_step"] == len(events) / steps
    total = {n: sum(e - s for _, m, s, e in events if m == n) for n in names}
    assert [total[r["name"]] for r in got["top"]] == sorted(total.values(), reverse=True)[:3]  # ties either way
    assert len({r["name"] for r in got["top"]}) == 3
    for r in got["top"]:
        assert abs(r["ms_per_step"] - total[r["name"]] / steps / 1e6) < 1e-12
        assert r["count_per_step"] == sum(m == r["name"] for _, m, _, _ in events) / steps


def test_step_sequence_is_one_step_of_the_loop_in_launch_order():
    prof = load()
    rng = np.random.default_rng()
    program = [f"k{i}" for i in rng.permutation(int(rng.integers(5, 40)))]  # one step's kernels, in launch order
    steps = int(rng.integers(3, 9))
    events, t = [], 0.0
    for _ in range(steps):
        for name in program:
            dur = float(rng.integers(1, 50))
            events.append((f"Stream #{rng.integers(2)}", name, t, t + dur))
            t += dur + float(rng.integers(0, 20))
    rng.shuffle(events)  # the trace's order is not the launch order
    seq = prof.summarise(events, steps)["step_sequence"]
    assert len(seq) == len(program)
    at = program.index(seq[0])
    assert seq == program[at:] + program[:at]  # a rotation of the step


def test_summary_without_events_says_so():
    assert "no device events" in load().summarise([], 5)["error"]


def test_main_times_every_variant_on_the_tiny_shape(tmp_path):
    """The script end to end on the CPU: each variant's decode program (`bench_generate._time_decode`, the program
    `generate` compiles) runs and is timed; the CPU trace has no device planes, which the summary says."""
    import json
    import subprocess
    import sys

    out = tmp_path / "prof.json"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--batch", "2", "--variants", "base,dense,packed",
           "--steps", "4", "--prompt", "8", "--experts", "3", "--rank", "2", "--out", str(out),
           "--block-sizes", '{"routed_glu": true}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["shape"] == "tiny" and res["batch"] == 2 and list(res["variants"]) == ["base", "dense", "packed"]
    assert res["block_sizes"] == {"routed_glu": True}
    for v, summ in res["variants"].items():
        assert summ["untraced_step_ms"] > 0 and summ["traced_wall_s"] > 0, v
        assert "no device events" in summ["error"], v


def test_bad_block_sizes_are_refused():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(SCRIPT), "--block-sizes", '{"routed_nope": 1}'], capture_output=True,
                          text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert proc.returncode == 2 and "--block-sizes: expected a JSON object of BlockSizes fields" in proc.stderr
