import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET when it is first imported, and any test that builds a pass
# pipeline imports graphprune.kernels: set it here, before any test module, so the kernels
# run on the CPU wherever there is no GPU, whatever order the files are collected and run in.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
