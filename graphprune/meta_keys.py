"""Names of the ``node.meta`` entries graphprune reads and writes, defined once.

| key | written by | holds |
|---|---|---|
| ``val`` | ``trace.propagate_shapes`` (and torch.export) | a meta/fake tensor, or a tuple of them, or a python value |
| ``gp_canon`` | ``canon.canonicalize`` | the node's ``COp``: canonical op name, operands and attributes |
"""
VAL = "val"
CANON = "gp_canon"
