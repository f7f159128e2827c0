import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

# The repository root holds ``kernels/`` and ``passes/``, installed only as ``graphprune.kernels`` and
# ``graphprune.passes``. ``python -m pytest`` puts the root on sys.path, where ``kernels/`` shadows Hugging
# Face's ``kernels`` package, which transformers >= 5.25 requires and imports when it builds a model
# ("cannot import name 'CUDAProperties' from 'kernels'"). graphprune itself comes from the install.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
if getattr(sys.modules.get("kernels"), "__file__", "") and sys.modules["kernels"].__file__.startswith(_ROOT):
    del sys.modules["kernels"]

# Triton reads TRITON_INTERPRET when it is first imported, and any test that builds a pass
# pipeline imports graphprune.kernels: set it here, before any test module, so the kernels
# run on the CPU wherever there is no GPU, whatever order the files are collected and run in.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# pytest-xdist runs the suite in two processes (``-n 2`` in pyproject's addopts), one per core of the CI machine:
# each takes one thread, as two processes of two threads each on two cores spin against each other.
# OMP_NUM_THREADS carries the same to the fresh processes tests start (a reload there must give the same bits).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# Latency tables (graphprune/latency_table.py) are cached on disk: the suite writes its own, never the user's,
# and removes it when the run ends (67 of them had piled up in /tmp).
if "GRAPHPRUNE_CACHE" not in os.environ:
    _cache = tempfile.TemporaryDirectory(prefix="graphprune-cache-")  # removed at exit by its finalizer
    os.environ["GRAPHPRUNE_CACHE"] = _cache.name


# torch seeds its generator from the OS at start-up: a test that draws a model or data without seeding got a
# different one every run, and a property that holds for most draws failed for some (test_sensitivity_curves:
# 3 of 20 seeds). Every test starts from the same state; one that wants others seeds them itself.
import random

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _release_memory():
    """Collect cycles and hand freed heap back to the OS (glibc keeps it otherwise): the suite runs ~1200 tests
    in one process, and the zoo at its end reached the 24 GB of the CI machine (killed by the OOM killer)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _zoo(request) -> bool:
    return request.module.__name__.endswith("test_zoo")  # 80 models, the largest ones last


@pytest.fixture(autouse=True, scope="module")
def _released_after_each_file(request):
    import gc

    if _zoo(request):  # what the earlier files left is frozen: a collection after each model walks its own objects
        _release_memory()  # only (a full one walked the whole suite's, 1.8 s a model, 143 s of the zoo)
        gc.freeze()
    yield
    gc.unfreeze()
    _release_memory()


@pytest.fixture(autouse=True)
def _released_after_each_zoo_model(request):
    yield
    if _zoo(request):
        _release_memory()


# ``@pytest.mark.full``: end-to-end smokes of the bench scripts, which run whole benchmark steps (10-16 s each on
# the 2-core CI machine). The suite must finish in 20 minutes there; these run with GRAPHPRUNE_FULL=1, as the
# zoo's larger members run with GRAPHPRUNE_ZOO=all. The bench scripts' own helpers keep their unit tests here.
def pytest_configure(config):
    config.addinivalue_line("markers", "full: a bench-script smoke, run with GRAPHPRUNE_FULL=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("GRAPHPRUNE_FULL") == "1":
        return
    skip = pytest.mark.skip(reason="a whole bench step: GRAPHPRUNE_FULL=1 runs it")
    for item in items:
        if item.get_closest_marker("full"):
            item.add_marker(skip)
