"""Names of the ``node.meta`` entries graphprune reads and writes, defined once.

| key | written by | holds |
|---|---|---|
| ``val`` | ``trace.propagate_shapes`` (and torch.export) | a meta/fake tensor, or a tuple of them, or a python value |
| ``gp_canon`` | ``canon.canonicalize`` | the node's ``COp``: canonical op name, operands and attributes |
| ``gp_added`` | ``shrink-params`` | on an op it put in that the model's code does not run (a max over removed zeros clamped at 0): what it computes |

and on ``gm.meta`` (the GraphModule):

| key | written by | holds |
|---|---|---|
| ``gp_plan`` | ``Pruner.prune`` (read by ``shrink-params``) | ``(value_key, axis) -> kept indices`` for every dim that shrinks |
| ``gp_example`` | ``trace`` | the example ``(args, kwargs)``, so the pass manager can re-run shapes |
| ``gp_fixed_dims`` | ``trace`` (torch.export) | the input dims the exported graph fixed to the example's size, as ``"x dim 2 (16)"`` |
| ``gp_bounded_dims`` | ``trace`` (torch.export) | input dims the exported graph keeps symbolic but bounds (a branch on a size, or shape arithmetic that holds on some sizes only): ``[(lower, upper or None, [(input leaf, dim), ...])]`` |
| ``gp_guard_sizes`` | ``trace`` (torch.export) | input sizes where an equality guard of the exported graph turns (``if x.shape[1] == 64`` at 12 refuses 64): ``[(size, [(input leaf, dim), ...])]``, which the module form is checked at |
| ``gp_symbolic_dims`` | ``trace`` (torch.export) | every input dim the exported graph keeps symbolic, one list per symbol: ``[[(input leaf, dim), ...], ...]`` (a size of 1 is never guarded: ``verify.wrong_at_tested_batches``) |
| ``gp_python_state`` | ``verify.check_trace`` | the Python attributes (or containers) the model's forward changed on the example, which a traced graph holds at the first call's values |
| ``gp_numbers`` | ``groups.build`` (read by ``shrink-params``) | ``sizes.NumberUse`` list: widths read as numbers, frozen where they shrink |
| ``gp_literal_moves`` | ``shrink-params`` | ``[(module path, int before, int after)]`` for the literals of each shape argument it rewrote (``view(B, T, 8, 64)`` -> ``6``), by the module whose code holds it: the module form sets that module's attributes to match (``module_form.follow_literals``) |
| ``graphprune`` | ``Pruner.prune`` | method, widths per group, unsupported ops |
| ``gp_original_flops``, ``gp_original_params``, ``gp_unread``, ``gp_positions``, ``gp_plan_flops`` | ``allocate``, ``auto`` | counts (and the parameter names the forward never reads, ``plan_flops.PlanFlops`` or False) of the traced original, cached (``CACHED``: never copied into a pruned graph, where they would be stale) |
"""
VAL = "val"
CANON = "gp_canon"
ADDED = "gp_added"
PLAN = "gp_plan"
EXAMPLE = "gp_example"
FIXED_DIMS = "gp_fixed_dims"
BOUNDED_DIMS = "gp_bounded_dims"
GUARD_SIZES = "gp_guard_sizes"
SYMBOLIC_DIMS = "gp_symbolic_dims"
NUMBERS = "gp_numbers"
PYTHON_STATE = "gp_python_state"
LITERAL_MOVES = "gp_literal_moves"
FROZEN_WIDTHS = "gp_frozen_widths"
ORIGINAL_FLOPS = "gp_original_flops"
ORIGINAL_PARAMS = "gp_original_params"
POSITIONS = "gp_positions"
UNREAD = "gp_unread"
PLAN_FLOPS = "gp_plan_flops"
CACHED = (ORIGINAL_FLOPS, ORIGINAL_PARAMS, UNREAD, POSITIONS, PLAN_FLOPS)
