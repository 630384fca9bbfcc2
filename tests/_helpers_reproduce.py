"""Import the scripts of experiments/reproduce/ (not a package) as modules in tests."""

import importlib.util
import sys
from pathlib import Path

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
