"""Superposed weights W ⊙ Σ_t α_t M_t over the bit-packed mask bank (the paper's Eq. 2).

The bank holds T binary masks per parameter as packed bytes (T, ⌈P/8⌉) (1 bit per weight). The superposed
mask S(α) = Σ_t α_t M_t and its gradient ∂L/∂α_t = ⟨∂L/∂S, M_t⟩ are computed block by block straight from the
packed bytes, never holding T float masks (the authors' code stacks all T masks in float32: 32 × the bytes):

* forward: tasks that share one α value are *counted*: Σ_{t: α_t = v} M_t is a per-weight popcount, done eight
  bytes at a time in 64-bit lanes (one byte lane per mask byte, widened before a lane could carry);
  S = Σ_v v · count_v. One-Shot (α = 1/T) and binary search (α uniform on the candidates) need one count, and
  the count of the first k tasks is cached per bank version (:func:`uniform_counts`).
* backward: ∂L/∂α_t = ⟨g, M_t⟩ with g = ∂L/∂S, a 1-bit × float GEMV over the packed rows. On CPU by masked
  adds: 16 float32 entries of g added under the matching 16 mask bits, one AVX-512 instruction
  (:mod:`supsup_lite.core.cpu_kernels`); on CUDA by byte tables G_j[v] = Σ_k bit_k(v) · g_{8j+k} for the 256
  byte values v and one gather per stored byte (the table-lookup GEMV of T-MAC).

On CPU both passes are numba kernels (:mod:`supsup_lite.core.cpu_kernels`: compiled on first use, cached on
disk, one thread per torch thread); on CUDA they are plain torch (:func:`mask_counts_torch`,
:func:`masks_dot_torch`). Up to ``DENSE_MAX_TASKS`` masks (per device type) are simply unpacked to floats
(cheaper for few tasks). Extra memory is a count, a table or a few lane sums per row, never T float masks.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import lru_cache

import torch
from torch import nn

from . import cpu_kernels
from .bits import packed_size, unpack_bits
from .masks import MaskBank
from .models import maskable_parameters

# CUDA (plain torch; the CPU kernels' constants are in cpu_kernels)
ROWS_PER_COUNT = 127   # rows summed in one int64 pass: 127 · 1 per byte lane never reaches the sign bit
COLUMN_BLOCK = 4096    # packed bytes per block in the count (a multiple of 8)
TABLE_BLOCK = 256      # packed bytes per block in the gradient (table: 256 × 256 values)
GATHER_ROWS = 4096     # tasks per block in the gradient
# up to this many masks, unpacking them to floats is as cheap as the kernels. CPU: only one mask (LeNet's 784 × 300
# layer, 2 threads: a dot product takes the kernel 0.03 ms for 1 mask and 0.06 ms for 8, unpacking 0.06 ms per
# mask; the count ties with unpacking at 2 masks and wins from 3). CUDA: one launch unpacks up to 24 at once.
DENSE_MAX_TASKS = {"cpu": 1, "cuda": 24}
UNIFORM_CACHE_SIZE = 4  # task-prefix lengths whose counts are cached per bank (each: P int32 per parameter)
_LANE_LOW_BITS = 0x0101010101010101  # bit 0 of each byte of an int64


def superposed_mask_reference(packed: torch.Tensor, numel: int, alphas: torch.Tensor) -> torch.Tensor:
    """Plain reference: unpack all T masks to floats, then Σ_t α_t M_t.

    packed: (T, ⌈P/8⌉) uint8, alphas: (T,) → (P,). Peak extra memory O(T·P) floats.
    """
    masks = unpack_bits(packed, numel, alphas.dtype)
    return alphas @ masks


@lru_cache(maxsize=16)
def bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The bits of every byte value: (256, 8), entry [v, k] = bit k of v (least significant first)."""
    values = torch.arange(256, device=device)
    return ((values[:, None] >> torch.arange(8, device=device)) & 1).to(dtype)


def unpack_float(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Like ``unpack_bits`` (same values) but by one table lookup per byte, faster for float outputs.

    packed: (..., ⌈P/8⌉) uint8 → (..., P) of ``dtype``.
    """
    if packed.shape[-1] != packed_size(numel):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {numel} bits "
                         f"(expected {packed_size(numel)} bytes)")
    table = bit_table(packed.device, dtype)
    bits = table.index_select(0, packed.reshape(-1).long())
    return bits.view(*packed.shape[:-1], -1)[..., :numel]


def dense_max_tasks(device: torch.device) -> int:
    """``DENSE_MAX_TASKS`` for ``device``'s type (other types than cpu: as CUDA)."""
    return DENSE_MAX_TASKS.get(device.type, DENSE_MAX_TASKS["cuda"])


def _task_rows(num_rows: int, rows: torch.Tensor | None) -> torch.Tensor:
    """Task indices as int64 (all ``num_rows`` by default), checked to lie in [0, num_rows)."""
    if rows is None:
        return torch.arange(num_rows)
    rows = rows.to(torch.int64)
    if rows.dim() != 1 or (rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < num_rows)):
        raise ValueError(f"rows must be a 1-d tensor of task indices in [0, {num_rows}), got {rows.tolist()}")
    return rows


def check_packed(packed: torch.Tensor, numel: int) -> None:
    """Raise a clear error unless ``packed`` is a 2-d uint8 tensor (T, ⌈numel/8⌉): T masks of ``numel`` bits."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed masks must be a 2-d uint8 tensor (T, ⌈P/8⌉), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_size(numel):
        raise ValueError(f"{packed.shape[1]} bytes per mask cannot hold exactly {numel} bits "
                         f"(expected {packed_size(numel)})")


# --- the two passes --------------------------------------------------------------------------------------------
def mask_counts(packed: torch.Tensor, numel: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight number of selected masks that keep it: Σ_{t ∈ rows} M_t, exact, as int32 (P,).

    packed: (T, ⌈P/8⌉) uint8; rows: (k,) int64 task indices (default: all). CPU: numba kernel; CUDA:
    :func:`mask_counts_torch`.
    """
    check_packed(packed, numel)
    if packed.device.type != "cpu":
        return mask_counts_torch(packed, numel, rows)
    rows = _task_rows(packed.shape[0], rows)
    counts_kernel, _ = cpu_kernels.compiled()
    out = torch.zeros(8 * packed.shape[1], dtype=torch.int32)
    threads = cpu_kernels.use_threads()
    counts_kernel(packed.contiguous().numpy(), rows.cpu().numpy(), out.numpy(), threads)
    return out[:numel]


def mask_counts_torch(packed: torch.Tensor, numel: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`mask_counts` in plain torch (the CUDA path): 8 bytes per int64 lane, ``ROWS_PER_COUNT`` rows a pass."""
    num_rows, num_bytes = packed.shape
    rows = torch.arange(num_rows, device=packed.device) if rows is None else rows.to(packed.device)
    counts = torch.zeros(8, num_bytes + 8, dtype=torch.int32, device=packed.device)  # [bit k, byte j]
    low_bits = torch.tensor(_LANE_LOW_BITS, dtype=torch.int64, device=packed.device)
    for start in range(0, rows.numel(), ROWS_PER_COUNT):
        block_rows = rows[start:start + ROWS_PER_COUNT]
        for col in range(0, num_bytes, COLUMN_BLOCK):
            block = packed[block_rows, col:col + COLUMN_BLOCK]
            lanes = torch.zeros(block.shape[0], block.shape[1] + (-block.shape[1] % 8), dtype=torch.uint8,
                                device=packed.device)
            lanes[:, :block.shape[1]] = block  # a private copy: the shifts below work in place
            lanes = lanes.view(torch.int64)
            for bit in range(8):
                per_byte = torch.bitwise_and(lanes, low_bits).sum(0).view(torch.uint8)
                counts[bit, col:col + per_byte.numel()] += per_byte
                lanes.bitwise_right_shift_(1)
    return counts[:, :num_bytes].T.reshape(-1)[:numel]


def masks_dot(packed: torch.Tensor, numel: int, vector: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inner product of stored masks with a vector: (⟨M_t, v⟩)_{t ∈ rows}. packed: (T, ⌈P/8⌉), vector: (P,),
    rows: (k,) int64 task indices (default: all) → (k,) of the vector's dtype.

    CPU: masked adds of v's entries under the mask bits (numba kernel, float32 or float64 sums; other dtypes are
    summed in float32); CUDA: byte tables (:func:`masks_dot_torch`). Up to ``DENSE_MAX_TASKS`` rows are
    unpacked instead.
    """
    check_packed(packed, numel)
    if vector.shape != (numel,) or not vector.is_floating_point():
        raise ValueError(f"the vector must be a floating tensor of shape ({numel},), one entry per weight; got "
                         f"{vector.dtype} {tuple(vector.shape)}")
    num_rows, num_bytes = packed.shape
    if (num_rows if rows is None else rows.numel()) <= dense_max_tasks(packed.device):
        selected = packed if rows is None else packed.index_select(0, rows.to(packed.device))
        return unpack_float(selected, numel, vector.dtype) @ vector
    if packed.device.type != "cpu":
        return masks_dot_torch(packed, numel, vector, rows)
    rows = _task_rows(num_rows, rows)
    _, dot_kernel = cpu_kernels.compiled()
    cpu_kernels.use_threads()
    dtype = vector.dtype if vector.dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.zeros(rows.numel(), dtype=torch.float64)
    dot_kernel(packed.contiguous().numpy(), rows.numpy(), vector.detach().to(dtype).contiguous().numpy(), out.numpy())
    return out.to(vector.dtype)


def masks_dot_torch(packed: torch.Tensor, numel: int, vector: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`masks_dot` in plain torch (the CUDA path): a (c, 256) table per block of c byte columns (one small
    matrix product), then one gather per stored byte, ``GATHER_ROWS`` rows at a time (no copy of the rows)."""
    num_rows, num_bytes = packed.shape
    rows = torch.arange(num_rows, device=packed.device) if rows is None else rows.to(packed.device)
    padded = torch.nn.functional.pad(vector, (0, 8 * num_bytes - numel)).view(num_bytes, 8)
    table_bits = bit_table(packed.device, vector.dtype).T  # (8, 256)
    out = torch.zeros(rows.numel(), dtype=vector.dtype, device=packed.device)
    for col in range(0, num_bytes, TABLE_BLOCK):
        table = padded[col:col + TABLE_BLOCK] @ table_bits  # (c, 256)
        for start in range(0, rows.numel(), GATHER_ROWS):
            index = packed[rows[start:start + GATHER_ROWS], col:col + TABLE_BLOCK].T.long()  # (c, r)
            out[start:start + index.shape[1]] += torch.gather(table, 1, index).sum(0)
    return out


def superposed_mask_packed(packed: torch.Tensor, numel: int, alphas: torch.Tensor) -> torch.Tensor:
    """Σ_t α_t M_t without the autograd wrapper: Σ over distinct nonzero values v of v · Σ_{α_t = v} M_t.

    packed: (T, ⌈P/8⌉) uint8, alphas: (T,) → (P,) of alphas.dtype. Tasks with α_t = 0 cost nothing.
    """
    out = torch.zeros(numel, dtype=alphas.dtype, device=packed.device)
    nonzero = torch.nonzero(alphas).squeeze(1)
    if nonzero.numel() == 0:
        return out
    if nonzero.numel() <= dense_max_tasks(packed.device):
        return alphas[nonzero] @ unpack_float(packed[nonzero], numel, alphas.dtype)
    values, group = torch.unique(alphas[nonzero], return_inverse=True)
    if values.numel() == 1:
        rows = nonzero if nonzero.numel() < alphas.numel() else None
        return out.add_(mask_counts(packed, numel, rows), alpha=values.item())
    for g, value in enumerate(values.tolist()):
        out.add_(mask_counts(packed, numel, nonzero[group == g]), alpha=value)
    return out


class _SuperposedMask(torch.autograd.Function):
    """S = Σ_t α_t M_t from packed masks (or ``value`` · ``counts`` when given: α uniform on the counted tasks);
    backward ∂L/∂α_t = ⟨∂L/∂S, M_t⟩ (both block-wise)."""

    @staticmethod
    def forward(ctx, alphas: torch.Tensor, packed: torch.Tensor, numel: int,  # noqa: D102
                counts: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.numel = numel
        if counts is None:
            return superposed_mask_packed(packed, numel, alphas)
        return counts.to(alphas.dtype) * alphas[alphas.nonzero()[0, 0]]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # noqa: D102
        (packed,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return masks_dot(packed, ctx.numel, grad.contiguous()), None, None, None


def superposed_mask(packed: torch.Tensor, numel: int, alphas: torch.Tensor, *,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """Superposed mask Σ_t α_t M_t, differentiable in ``alphas``. packed: (T, ⌈P/8⌉) uint8, alphas: (T,) → (P,).

    Equals :func:`superposed_mask_reference` (values and gradient) with O(block) instead of O(T·P) extra memory.
    ``counts``: Σ_t M_t over the tasks where α ≠ 0 (P,) when α is one value there (:func:`uniform_counts`),
    so the forward is one scaling.
    """
    check_packed(packed, numel)
    if alphas.shape != (packed.shape[0],) or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a floating tensor of shape ({packed.shape[0]},), one per mask; "
                         f"got {alphas.dtype} {tuple(alphas.shape)}")
    if alphas.device != packed.device:
        raise ValueError(f"alphas are on {alphas.device} but the masks on {packed.device}")
    return _SuperposedMask.apply(alphas, packed, numel, counts)


def check_alphas(bank: MaskBank, alphas: torch.Tensor) -> None:
    """Raise a clear error unless ``alphas`` is a (T,) floating tensor for a non-empty bank of T tasks."""
    if len(bank) == 0:
        raise ValueError("cannot superpose an empty mask bank: train at least one task first")
    if alphas.shape != (len(bank),) or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a floating tensor of shape ({len(bank)},), one per task in the bank; "
                         f"got {alphas.dtype} {tuple(alphas.shape)}")


_UNIFORM_CACHE: "weakref.WeakKeyDictionary[MaskBank, OrderedDict]" = weakref.WeakKeyDictionary()


def uniform_prefix(alphas: torch.Tensor) -> int | None:
    """k when α is one value on tasks 0..k−1 and 0 after, with k > ``DENSE_MAX_TASKS`` (a cached count), else None."""
    nonzero = torch.count_nonzero(alphas).item()
    if nonzero <= dense_max_tasks(alphas.device) or not bool((alphas[:nonzero] == alphas[0]).all()):
        return None
    return nonzero if nonzero == alphas.numel() or not bool(alphas[nonzero:].any()) else None


def uniform_counts(bank: MaskBank, name: str, num_tasks: int) -> torch.Tensor:
    """Σ_{t < k} M_t of parameter ``name`` over the first k = ``num_tasks`` tasks, as int32 (P,) on the bank's device.

    Cached per bank: reused until the bank changes (``bank.version``, bumped by ``append`` and ``replace``) or
    moves; the ``UNIFORM_CACHE_SIZE`` most recent prefix lengths are kept. This is the superposition of One-Shot (α
    = 1/k) and of binary search's first step, identical for every batch.
    """
    packed = bank.packed(name)
    entries = _UNIFORM_CACHE.setdefault(bank, OrderedDict())
    stamp = (bank.version, packed.data_ptr(), packed.device)
    key = (name, num_tasks)
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        entries.move_to_end(key)
        return hit[1]
    counts = mask_counts(packed[:num_tasks], bank.numels[name])
    entries[key] = (stamp, counts)
    entries.move_to_end(key)
    while len(entries) > UNIFORM_CACHE_SIZE * len(bank.shapes):
        entries.popitem(last=False)
    return counts


def superposed_weights(model: nn.Module, bank: MaskBank, alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Effective weights W ⊙ Σ_t α_t M_t for every masked parameter; differentiable in ``alphas`` (T,).

    The backward gives ∂L/∂α_t = ⟨∂L/∂W_eff ⊙ W, M_t⟩ straight from the packed bank. α uniform on a prefix of
    the tasks (One-Shot) reuses the cached count of :func:`uniform_counts`.
    """
    bank.check_compatible(model)
    check_alphas(bank, alphas)
    params = maskable_parameters(model)
    prefix = uniform_prefix(alphas.detach())
    weights = {}
    for name, numel in bank.numels.items():
        counts = None if prefix is None else uniform_counts(bank, name, prefix)
        mask = superposed_mask(bank.packed(name), numel, alphas, counts=counts)
        weights[name] = params[name] * mask.view(params[name].shape)
    return weights
