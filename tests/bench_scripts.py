"""Import bench/ scripts from tests (bench/ is no package): by file, each once per process."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def bench_module(*names: str):
    """The bench scripts ``names``, imported in order (a script's own imports of the ones before it find
    them in ``sys.modules``); returns the last. bench/ is appended to ``sys.path``, not put first, so
    ``bench/kernels.py`` cannot shadow the ``kernels`` package transformers imports."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    for name in names:
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
    return sys.modules[names[-1]]
