"""Kernel tests run the Triton kernels for real: on a GPU when there is one,
otherwise under Triton's interpreter, which must be switched on before the
kernels are defined (that is, before graphprune.kernels is imported)."""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    """Where the kernels can run: CUDA, else CPU under the interpreter."""
    from graphprune.kernels import bsr_linear

    if torch.cuda.is_available():
        return torch.device("cuda")
    if bsr_linear._INTERPRET:
        return torch.device("cpu")
    pytest.skip("graphprune.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make torch.empty return NaN-filled floats, so an output element the
    kernel forgets to write shows up as NaN instead of happening to be right."""
    real_empty = torch.empty

    def nan_empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
