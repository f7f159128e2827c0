"""Block-sparse ``y = x @ W.T + b`` on tensor cores.

Motivation. Removing whole channels speeds a model up, but only until accuracy
suffers. Sparsity finer than a channel gives nothing to a dense GEMM, which
multiplies the zeros anyway. If the zeros come in whole (bn, bk) blocks of 16
to 128, a kernel can skip them and still feed the tensor cores: the speed-up
can approach 1 / density, in FLOPs when many tokens share the weight, in
weight bytes when few do (decode).

Layout. W (N, K) is stored in BSR form (``layout.BlockSparseWeight``): per
block row of bn output features, the stored (bn, bk) blocks and their block
columns. Tokens sit on the MMA M dimension: every stored block is the B operand
of a ``(BLOCK_M, bk) @ (bk, bn)`` product, so even a 16-wide block is one
tensor-core instruction per 16 tokens, and x is read in its own layout.

Two kernels, chosen by the token count M:

* ``_bsr_rows_kernel`` (M > 16). One program per (token tile, block row). It
  walks the stored blocks of its block row, gathers the matching (BLOCK_M, bk)
  slice of x, and accumulates (BLOCK_M, bn) in fp32. Programs are numbered so
  that GROUP_M token tiles sweep all block rows together, keeping both those x
  tiles and the weight in L2. Within a sweep the block rows go longest first
  (``row_order``), so uneven rows do not leave one long row running alone at
  the end of the last wave.
* ``_bsr_splitk_kernel`` (M <= 16, decode). The work is reading the weight
  once; there are too few (token tile, block row) pairs to occupy every SM
  (64 block rows for N = 8192 and 128-blocks) and rows are uneven. So each
  block row's stored blocks are cut into chunks of equal length, one program
  per chunk (a few per SM). A program with a whole row to itself writes y
  directly. Otherwise it parks its fp32 partial sum and takes a ticket from a
  per-row counter; the program that takes the last ticket adds the row's
  partials in a fixed order (so results do not depend on timing), writes y
  and resets the counter for the next call. One launch, no zero-filling.

Both kernels accumulate in fp32 for fp16, bf16 and fp32 operands (fp32 uses
TF32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` says so)
and add the bias in the epilogue. A block row with no stored blocks still gets its
output written (the bias, or zeros).

Dense fallback. Skipping zeros costs gathers, shorter K loops and partial
sums; a dense cuBLAS GEMM has none of them. ``_prefers_dense`` is a two-line
model of when that overhead eats the gain: the kernel runs at a fraction
``efficiency`` of cuBLAS speed per stored block, so it wins only while
``density < efficiency``. The efficiencies are per block size and per regime
(compute bound for M > 16, weight bandwidth bound below); they are the
break-even points the benchmark (bench/kernels.py) is there to measure.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``,
set before Triton is imported), which is how the tests check them; on a CPU
otherwise the plain torch reference at the end of this file does the work.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from graphprune.errors import GraphpruneError

from .layout import BlockSparseWeight

__all__ = ["block_sparse_linear", "block_sparse_linear_reference", "SMALL_M"]

#: Token counts up to this use the split-K kernel (one 16-row MMA tile).
SMALL_M = 16

_INTERPRET = bool(triton.knobs.runtime.interpret)
# bf16 tl.dot is broken under the interpreter (outputs of 1e10 where the reference gives 1): torch computes those
_KERNEL_DTYPES = (torch.float16, torch.float32) if _INTERPRET else (torch.float16, torch.bfloat16, torch.float32)

# Kernel efficiency relative to cuBLAS, by smaller block edge: the density at
# which the block-sparse kernel and the dense GEMM take equally long. Below it
# the kernel wins. First guesses, to be refit from bench/results/.
_BREAK_EVEN_DENSITY = {
    "large_m": {16: 0.35, 32: 0.5, 64: 0.7, 128: 0.85},
    "small_m": {16: 0.6, 32: 0.75, 64: 0.85, 128: 0.9},
}

# Split-K work items per SM for the decode kernel: enough resident programs to
# keep weight loads in flight, few enough that partial sums stay cheap.
_ITEMS_PER_SM = 4


# ----------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------

def _bench_quickly(kernel_call, quantiles):
    # The default benchmarker spends ~125 ms per config; tuning happens once per
    # (shape, block, density bucket, device), and these kernels run for
    # microseconds to a millisecond, so 5 + 20 ms gives a stable median.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _max_shared_memory(tensor: torch.Tensor) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(tensor.device.index)["max_shared_mem"]


def _rows_configs() -> list:
    if _INTERPRET:  # the interpreter cannot time anything; one config keeps tests fast
        return [triton.Config({"BLOCK_M": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": block_m, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for block_m, warps, stages in ((64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3), (128, 4, 5), (256, 8, 3))
    ]


def _prune_rows_configs(configs, nargs, **kwargs):
    """Drop token tiles far taller than M and configs whose pipeline does not
    fit in shared memory (they would fail to launch)."""
    x = nargs["x_ptr"]
    m, bn, bk = nargs["M"], kwargs["BN"], kwargs["BK"]
    smem = _max_shared_memory(x)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(m))
        and (c.num_stages - 1) * (c.kwargs["BLOCK_M"] + bn) * bk * x.element_size() <= smem
    ]
    return kept or configs[:1]


def _splitk_configs() -> list:
    if _INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in ((4, 3), (4, 5), (8, 4), (2, 6))]


def _prune_splitk_configs(configs, nargs, **kwargs):
    x = nargs["x_ptr"]
    smem = _max_shared_memory(x)
    kept = [c for c in configs if (c.num_stages - 1) * (SMALL_M + kwargs["BN"]) * kwargs["BK"] * x.element_size() <= smem]
    return kept or configs[:1]


_TUNING_KEY = ["M_BUCKET", "N", "K", "BN", "BK", "DENSITY_BUCKET", "DEVICE_KEY"]
# Kernel arguments that exist only to key the tuning cache: not specializing on
# them (Triton would for the value 1) avoids compiling identical code twice.
_TUNING_ONLY = ["M_BUCKET", "DENSITY_BUCKET", "DEVICE_KEY"]


# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------

@triton.jit
def _store_tile(
    acc, bias_ptr, y_ptr, offs_m, offs_n, M, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
):
    """Epilogue: add the bias to a (BLOCK_M, BN) fp32 tile, cast, store the valid rows."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=offs_m[:, None] < M)


@triton.jit
def _block_row_product(
    acc, x_ptr, values_ptr, col_idx_ptr, first_block, end_block, offs_m, M, stride_xm, stride_xk,
    BN: tl.constexpr, BK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc += x[offs_m, cols of blocks] @ blocks.T for stored blocks first_block..end_block-1."""
    offs_k = tl.arange(0, BK)
    offs_n = tl.arange(0, BN)
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1)
    w_tile = offs_k[:, None] + offs_n[None, :] * BK  # (BK, BN): block j read transposed
    m_mask = offs_m[:, None] < M
    # int64 block index: nnz * BN * BK may pass 2**31 elements for very large layers.
    for j in range(first_block.to(tl.int64), end_block.to(tl.int64)):
        col = tl.load(col_idx_ptr + j)
        a = tl.load(x_rows + (col * BK + offs_k)[None, :] * stride_xk, mask=m_mask, other=0.0)  # (BLOCK_M, BK)
        b = tl.load(values_ptr + j * (BN * BK) + w_tile)  # (BK, BN)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(configs=_rows_configs(), key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_rows_configs},
                 do_bench=_bench_quickly)
@triton.jit(do_not_specialize=_TUNING_ONLY)
def _bsr_rows_kernel(
    # pointers
    x_ptr, values_ptr, row_ptr_ptr, col_idx_ptr, row_order_ptr, bias_ptr, y_ptr,
    # sizes
    M, N, K, NUM_BLOCK_ROWS,
    # strides
    stride_xm, stride_xk, stride_ym, stride_yn,
    # tuning keys (not read by the kernel)
    M_BUCKET, DENSITY_BUCKET, DEVICE_KEY,
    # meta-parameters
    BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Program order: GROUP_M token tiles at a time, tiles fastest, block rows in
    # row_order (longest first) within the group.
    pid = tl.program_id(0)
    num_tiles_m = tl.cdiv(M, BLOCK_M)
    programs_per_group = GROUP_M * NUM_BLOCK_ROWS
    first_tile_m = (pid // programs_per_group) * GROUP_M
    group_size = min(num_tiles_m - first_tile_m, GROUP_M)
    pid_in_group = pid % programs_per_group
    tile_m = first_tile_m + pid_in_group % group_size
    row = tl.load(row_order_ptr + pid_in_group // group_size)

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    acc = _block_row_product(
        acc, x_ptr, values_ptr, col_idx_ptr, tl.load(row_ptr_ptr + row), tl.load(row_ptr_ptr + row + 1),
        offs_m, M, stride_xm, stride_xk, BN, BK, INPUT_PRECISION,
    )
    _store_tile(acc, bias_ptr, y_ptr, offs_m, row * BN + tl.arange(0, BN), M, stride_ym, stride_yn, HAS_BIAS)


@triton.autotune(configs=_splitk_configs(), key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_splitk_configs},
                 do_bench=_bench_quickly)
@triton.jit(do_not_specialize=_TUNING_ONLY)
def _bsr_splitk_kernel(
    # pointers
    x_ptr, values_ptr, col_idx_ptr, bias_ptr, y_ptr,
    item_row_ptr, item_start_ptr, item_end_ptr, row_items_ptr, partial_ptr, ticket_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_ym, stride_yn,
    # tuning keys (not read by the kernel)
    M_BUCKET, DENSITY_BUCKET, DEVICE_KEY,
    # meta-parameters
    BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    item = tl.program_id(0)
    row = tl.load(item_row_ptr + item)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BN)
    acc = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
    acc = _block_row_product(
        acc, x_ptr, values_ptr, col_idx_ptr, tl.load(item_start_ptr + item), tl.load(item_end_ptr + item),
        offs_m, M, stride_xm, stride_xk, BN, BK, INPUT_PRECISION,
    )

    first_item = tl.load(row_items_ptr + row)
    num_items = tl.load(row_items_ptr + row + 1) - first_item
    if num_items == 1:
        _store_tile(acc, bias_ptr, y_ptr, offs_m, row * BN + offs_n, M, stride_ym, stride_yn, HAS_BIAS)
    else:
        tile = offs_m[:, None] * BN + offs_n[None, :]  # (BLOCK_M, BN) offsets of one partial
        m_mask = offs_m[:, None] < M
        tl.store(partial_ptr + item * (BLOCK_M * BN) + tile, acc, mask=m_mask)
        # Every thread's partial is written before one thread takes the ticket;
        # the ticket's acquire-release order makes them visible to the last program.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel", scope="gpu")
        if ticket == num_items - 1:
            total = tl.zeros((BLOCK_M, BN), dtype=tl.float32)
            for i in range(first_item, first_item + num_items):
                # .cg reads from L2, where the other programs' partials landed.
                total += tl.load(partial_ptr + i * (BLOCK_M * BN) + tile, mask=m_mask, other=0.0, cache_modifier=".cg")
            _store_tile(total, bias_ptr, y_ptr, offs_m, row * BN + offs_n, M, stride_ym, stride_yn, HAS_BIAS)
            tl.atomic_xchg(ticket_ptr + row, 0)


# ----------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------

def block_sparse_linear(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None, *,
                        backend: str = "auto") -> torch.Tensor:
    """``y = x @ W.T + bias`` for x of shape (..., K) and a block-sparse W (N, K).

    ``backend``: ``"auto"`` runs the Triton kernel (on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``) unless the cost model predicts a dense GEMM is
    faster; ``"kernel"`` always runs the kernel; ``"dense"`` multiplies by the
    dense masked weight. On a CPU without the interpreter, and for dtypes the
    kernel does not take (float64), the torch reference computes the result.
    The kernel path has no backward: it is for inference.
    """
    _check_inputs(x, weight, bias, backend)
    if x.device.type == "meta":  # shape propagation (graphprune's graph checks) needs only the shape
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    can_launch = x.is_cuda or (_INTERPRET and x.device.type == "cpu")
    if backend == "kernel" and not (can_launch and x.dtype in _KERNEL_DTYPES):
        raise GraphpruneError(
            f"backend='kernel' needs a CUDA tensor in fp16/bf16/fp32 (or, with TRITON_INTERPRET=1 set before importing "
            f"triton, a CPU tensor in fp16/fp32); got {x.dtype} on {x.device}. Use backend='auto' to fall back to torch."
        )
    if not can_launch or x.dtype not in _KERNEL_DTYPES:
        return block_sparse_linear_reference(x, weight, bias)
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.values.requires_grad or (bias is not None and bias.requires_grad))
    if grad and backend != "dense":  # "dense" multiplies in torch: it takes gradients (survey 27 f18: it was refused too)
        raise GraphpruneError(
            "block_sparse_linear has no backward pass; run it under torch.no_grad() / torch.inference_mode(), "
            "or call block_sparse_linear_reference (or backend='dense') for a differentiable version"
        )

    (n, k), (bn, bk) = weight.shape, weight.block_size
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or weight.nnz == 0:  # nothing to multiply: every output is the bias
        y = x.new_zeros(*x.shape[:-1], n)
        return y if bias is None else y + bias
    if backend == "dense" or (backend == "auto" and _prefers_dense(weight, m)):
        # the cached dense weight holds no graph: where gradients are asked for, the reference rebuilds it
        return F.linear(x, weight.dense(), bias) if x.is_cuda and not grad else block_sparse_linear_reference(x, weight, bias)

    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # (M, N)
    has_bias = bias is not None
    common = dict(
        M_BUCKET=triton.next_power_of_2(m), DENSITY_BUCKET=round(weight.density * 20), DEVICE_KEY=_device_key(x.device),
        BN=bn, BK=bk, HAS_BIAS=has_bias,
        INPUT_PRECISION="tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee",
    )
    # the kernels index the bias and the block values as dense arrays: a strided view read other numbers
    bias_arg = bias.contiguous() if has_bias else y  # never read when HAS_BIAS is false
    values = weight.values if weight.values.is_contiguous() else weight.values.contiguous()
    if m > SMALL_M:
        num_block_rows = n // bn
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * num_block_rows,)  # noqa: E731
        _bsr_rows_kernel[grid](
            x2, values, weight.row_ptr, weight.col_idx, weight.row_order, bias_arg, y,
            m, n, k, num_block_rows,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            **common,
        )
    else:
        plan = _splitk_plan(weight, x.device)
        partials = torch.empty((plan["num_items"], SMALL_M, bn), dtype=torch.float32, device=x.device)
        grid = (plan["num_items"],)
        _bsr_splitk_kernel[grid](
            x2, values, weight.col_idx, bias_arg, y,
            plan["item_row"], plan["item_start"], plan["item_end"], plan["row_items"], partials, plan["tickets"],
            m, n, k,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            BLOCK_M=SMALL_M, **common,
        )
    return y.reshape(*x.shape[:-1], n)


def _check_inputs(x, weight, bias, backend) -> None:
    if backend not in ("auto", "kernel", "dense"):
        raise GraphpruneError(f"backend must be 'auto', 'kernel' or 'dense', got {backend!r}")
    if not isinstance(weight, BlockSparseWeight):
        raise GraphpruneError(
            f"weight must be a BlockSparseWeight, got {type(weight).__name__}; build one with BlockSparseWeight.from_dense(w, block_size)"
        )
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise GraphpruneError(f"x has shape {tuple(x.shape)}; its last dimension must be the weight's K = {k}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise GraphpruneError(
            f"x is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}; "
            f"move one of them with .to(...) so they match"
        )
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise GraphpruneError(
            f"bias must be a ({n},) {x.dtype} tensor on {x.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )


def _prefers_dense(weight: BlockSparseWeight, m: int) -> bool:
    """The cost model: dense wins once density reaches the kernel's efficiency."""
    regime = "small_m" if m <= SMALL_M else "large_m"
    return weight.density >= _BREAK_EVEN_DENSITY[regime][min(weight.block_size)]


_DEVICE_KEYS: dict[str, int] = {}


@functools.cache
def _device_key(device: torch.device) -> int:
    """A small integer per device model, so tuned configs are not shared across GPUs."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter"
    return _DEVICE_KEYS.setdefault(name, len(_DEVICE_KEYS))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splitk_plan(weight: BlockSparseWeight, device: torch.device) -> dict:
    """Cut every block row into chunks of ``chunk`` stored blocks.

    Work item i covers blocks item_start[i]:item_end[i] of block row
    item_row[i]; the items of row r are row_items[r]:row_items[r+1]. An empty
    row still gets one (empty) item, which writes its bias. Under the
    interpreter chunks are 2 blocks long so tests exercise the cross-program sum.
    The ticket counters belong to the weight, so two launches with the same
    weight must not overlap (e.g. on two CUDA streams at once).
    """
    if _INTERPRET and device.type == "cpu":
        chunk = 2
    else:
        chunk = max(1, -(-weight.nnz // (_ITEMS_PER_SM * _sm_count(device))))
    key = ("splitk", chunk, str(device))
    if key not in weight._cache:
        counts = (weight.row_ptr[1:] - weight.row_ptr[:-1]).long().cpu()  # (R,)
        items_per_row = torch.clamp((counts + chunk - 1) // chunk, min=1)  # (R,)
        row_items = torch.zeros(counts.numel() + 1, dtype=torch.long)
        row_items[1:] = torch.cumsum(items_per_row, 0)
        item_row = torch.repeat_interleave(torch.arange(counts.numel()), items_per_row)  # (items,)
        item_in_row = torch.arange(item_row.numel()) - row_items[item_row]
        row_start = weight.row_ptr.long().cpu()[item_row]
        item_start = row_start + item_in_row * chunk
        item_end = torch.minimum(item_start + chunk, row_start + counts[item_row])
        weight._cache[key] = {
            "num_items": int(item_row.numel()),
            "item_row": item_row.to(device=device, dtype=torch.int32),
            "item_start": item_start.to(device=device, dtype=torch.int32),
            "item_end": item_end.to(device=device, dtype=torch.int32),
            "row_items": row_items.to(device=device, dtype=torch.int32),
            "tickets": torch.zeros(counts.numel(), dtype=torch.int32, device=device),
        }
    return weight._cache[key]


# ----------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------

def block_sparse_linear_reference(x: torch.Tensor, weight: BlockSparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in plain torch: the dense masked weight, accumulated in
    fp32 (float64 stays float64), cast back to x's dtype. Differentiable, runs
    anywhere; it is what block_sparse_linear computes on a CPU without the
    Triton interpreter."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to_dense() if weight.values.requires_grad else weight.dense()  # a cached copy would hold a stale graph
    y = F.linear(x.to(acc), w.to(acc), None if bias is None else bias.to(acc))
    return y.to(x.dtype)
