"""Model cost: FLOPs with torch.utils.flop_counter, parameters, CPU latency."""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*example_inputs, **(example_kwargs or {}))
    return counter.get_total_flops()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def latency_ms(model: torch.nn.Module, example_inputs: tuple, *, warmup: int = 3, runs: int = 10) -> float:
    """Median wall time of a forward pass on the inputs' device."""
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t = time.perf_counter()
            model(*example_inputs)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
