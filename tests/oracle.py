"""The lossless oracle: kill 25% of every group's units, prune exactly those, compare."""
import numpy as np
import torch

import graphprune
from graphprune.pruner import remove_lowest


def kill_units(model: torch.nn.Module, inputs: tuple, frac: float, seed: int = 0) -> int:
    """Zero every learnable slice (producer rows, bias, norm affine, loose
    parameters, consumer columns) of round(frac * n) units of every group.
    Returns the number of groups touched."""
    analysis = graphprune.analyze(model, inputs)
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    touched = 0
    with torch.no_grad():
        for g in analysis.groups:
            k = min(int(round(frac * g.n_units)), g.n_units - 1)
            if k == 0:
                continue
            dead = np.zeros(g.n_units, dtype=bool)
            dead[remove_lowest(g, rng.random(g.n_units), k)] = True
            for s in g.params:
                if s.name in params:
                    idx = torch.as_tensor(np.flatnonzero(dead[s.unit_of]))
                    params[s.name].index_fill_(s.axis, idx, 0.0)
            touched += 1
    return touched


def assert_lossless(model_fn, shape, frac=0.25, seed=0, **compile_kw):
    torch.manual_seed(seed)
    model = model_fn().eval()
    x = torch.randn(*shape)
    assert kill_units(model, (x,), frac, seed) > 0, "no prunable group found"
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if compile_kw.get("calibration") == "random":
        compile_kw["calibration"] = [(torch.randn(*shape),) for _ in range(3)]
    small = graphprune.compile(model, (x,), ratio=frac, **{"importance": "l1", **compile_kw})
    with torch.no_grad():
        out = small(x)
        again = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert graphprune.count_params(small) < graphprune.count_params(model)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(again, ref)
    return model, small
