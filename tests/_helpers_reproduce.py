"""Import the scripts of experiments/reproduce/ (not a package) as modules in tests; small BIG-bench task.json
sources written here."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPRODUCE = Path(__file__).resolve().parent.parent / "experiments" / "reproduce"


def load_script(name: str):
    """The module experiments/reproduce/<name>.py (registered in sys.modules under `name`)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPRODUCE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def source_presets() -> dict:
    """bigbench_tasks presets for `make_source`'s three tasks."""
    bb = load_script("bigbench_tasks")
    return {"pick": bb.Preset(), "count": bb.Preset(accuracy="exact_ci"),
            "say": bb.Preset(accuracy="first_word", text_metrics=True, primary="rougeL")}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_source(root: Path, n: int = 24, seed: int = 0) -> Path:
    """Three tasks: `pick` (multiple choice, own prefixes), `count` (generative, two subtasks with their own
    prefixes, list targets), `say` (BIG-bench default prefixes, a free-text target beside target_scores)."""
    rng = np.random.default_rng(seed)
    src = root / "src"
    colours = ["red", "green", "blue", "black"]
    pick = [{"input": f"The {i}th ball is {c}. Which colour?",
             "target_scores": {x: int(x == c) for x in colours}}
            for i, c in enumerate(rng.choice(colours, size=n))]
    write_json(src / "pick" / "task.json", {"name": "pick", "task_prefix": "Colours.\n",
                                            "example_input_prefix": "\nBall: ", "example_output_prefix": "\nColour: ",
                                            "examples": pick})
    write_json(src / "count" / "task.json", {"name": "count", "description": "no examples here"})
    for sub, word in (("apples", "apple"), ("pears", "pear")):
        ex = [{"input": f"{k} {word}s and {j} {word}s?", "target": [str(k + j), f"{k + j} {word}s"]}
              for k, j in rng.integers(1, 50, size=(n, 2))]
        write_json(src / "count" / sub / "task.json", {"example_input_prefix": f"{sub}: ",
                                                       "example_output_prefix": " =", "examples": ex})
    say = [{"input": f"Is {i} even?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2)},
            "target": f"{'Yes' if i % 2 == 0 else 'No'}.  Because   {i} mod 2 is {i % 2}."} for i in range(n)]
    write_json(src / "say" / "task.json", {"examples": say})
    return src
