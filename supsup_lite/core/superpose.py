"""Superposed weights W ⊙ Σ_t α_t M_t over the bit-packed mask bank (the paper's Eq. 2).

The bank holds T binary masks per parameter as packed bytes (T, ⌈P/8⌉) (1 bit per weight). The superposed
mask S(α) = Σ_t α_t M_t and its gradient ∂L/∂α_t = ⟨∂L/∂S, M_t⟩ are computed block by block straight from the
packed bytes, never holding T float masks (the authors' code stacks all T masks in float32: 32 × the bytes):

* forward: tasks that share one α value are *counted*: Σ_{t: α_t = v} M_t is a per-weight popcount, done eight
  bytes at a time in int64 lanes (one byte lane per mask byte, ≤ 127 rows per block so a lane never carries);
  S = Σ_v v · count_v. One-Shot (α = 1/T) and binary search (α uniform on the candidates) need one count.
* backward: for every byte column j, a table G_j[v] = Σ_k bit_k(v) · g_{8j+k} of the 256 byte values (one small
  matrix product), then ∂L/∂α_t = Σ_j G_j[byte_{t,j}] by one gather per stored byte.

Up to ``DENSE_MAX_TASKS`` masks are simply unpacked to floats (cheaper for few tasks). Extra memory is a few MB
per block, independent of T.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .bits import packed_size, unpack_bits
from .masks import MaskBank
from .models import maskable_parameters

ROWS_PER_COUNT = 127   # rows summed in one int64 pass: 127 · 1 per byte lane never reaches the sign bit
COLUMN_BLOCK = 4096    # packed bytes per block in the forward count (a multiple of 8)
TABLE_BLOCK = 256      # packed bytes per block in the backward gather (table: 256 × 256 values)
GATHER_ROWS = 4096     # tasks per block in the backward gather
DENSE_MAX_TASKS = 24   # up to this many masks, unpacking them to floats is cheaper than counting / tables
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


def mask_counts(packed: torch.Tensor, numel: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight number of selected masks that keep it: Σ_{t ∈ rows} M_t, exact, as int32 (P,).

    packed: (T, ⌈P/8⌉) uint8; rows: (k,) int64 task indices (default: all). Counts 8 bytes per int64 lane.
    """
    num_rows, num_bytes = packed.shape
    rows = torch.arange(num_rows, device=packed.device) if rows is None else rows
    counts = torch.zeros(8, num_bytes + 8, dtype=torch.int32, device=packed.device)  # [bit k, byte j]
    low_bits = torch.tensor(_LANE_LOW_BITS, dtype=torch.int64, device=packed.device)
    contiguous = rows.numel() == num_rows and bool((rows == torch.arange(num_rows, device=rows.device)).all())
    for start in range(0, rows.numel(), ROWS_PER_COUNT):
        block_rows = slice(start, start + ROWS_PER_COUNT) if contiguous else rows[start:start + ROWS_PER_COUNT]
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


def masks_dot(packed: torch.Tensor, numel: int, vector: torch.Tensor) -> torch.Tensor:
    """Inner product of every stored mask with a vector: (⟨M_t, v⟩)_t. packed: (T, ⌈P/8⌉), vector: (P,) → (T,).

    Byte-table method: G_j[v] = Σ_k bit_k(v) · v_{8j+k} for all 256 byte values v, then Σ_j G_j[byte_{t,j}].
    Up to ``DENSE_MAX_TASKS`` masks are unpacked instead (cheaper than building the tables).
    """
    num_rows, num_bytes = packed.shape
    if num_rows <= DENSE_MAX_TASKS:
        return unpack_float(packed, numel, vector.dtype) @ vector
    padded = torch.nn.functional.pad(vector, (0, 8 * num_bytes - numel)).view(num_bytes, 8)
    table_bits = bit_table(packed.device, vector.dtype).T  # (8, 256)
    out = torch.zeros(num_rows, dtype=vector.dtype, device=packed.device)
    for col in range(0, num_bytes, TABLE_BLOCK):
        table = padded[col:col + TABLE_BLOCK] @ table_bits  # (c, 256)
        for start in range(0, num_rows, GATHER_ROWS):
            index = packed[start:start + GATHER_ROWS, col:col + TABLE_BLOCK].T.long()  # (c, r)
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
    if nonzero.numel() <= DENSE_MAX_TASKS:
        return alphas[nonzero] @ unpack_float(packed[nonzero], numel, alphas.dtype)
    values, group = torch.unique(alphas[nonzero], return_inverse=True)
    if values.numel() == 1:
        rows = nonzero if nonzero.numel() < alphas.numel() else None
        return out.add_(mask_counts(packed, numel, rows), alpha=values.item())
    for g, value in enumerate(values.tolist()):
        out.add_(mask_counts(packed, numel, nonzero[group == g]), alpha=value)
    return out


class _SuperposedMask(torch.autograd.Function):
    """S = Σ_t α_t M_t from packed masks; backward ∂L/∂α_t = ⟨∂L/∂S, M_t⟩ (both block-wise)."""

    @staticmethod
    def forward(ctx, alphas: torch.Tensor, packed: torch.Tensor, numel: int) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(packed)
        ctx.numel = numel
        return superposed_mask_packed(packed, numel, alphas)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # noqa: D102
        (packed,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return masks_dot(packed, ctx.numel, grad.contiguous()), None, None


def superposed_mask(packed: torch.Tensor, numel: int, alphas: torch.Tensor) -> torch.Tensor:
    """Superposed mask Σ_t α_t M_t, differentiable in ``alphas``. packed: (T, ⌈P/8⌉) uint8, alphas: (T,) → (P,).

    Equals :func:`superposed_mask_reference` (values and gradient) with O(block) instead of O(T·P) extra memory.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"packed masks must be a 2-d uint8 tensor (T, ⌈P/8⌉), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_size(numel):
        raise ValueError(f"{packed.shape[1]} bytes per mask cannot hold exactly {numel} bits "
                         f"(expected {packed_size(numel)})")
    if alphas.shape != (packed.shape[0],) or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a floating tensor of shape ({packed.shape[0]},), one per mask; "
                         f"got {alphas.dtype} {tuple(alphas.shape)}")
    if alphas.device != packed.device:
        raise ValueError(f"alphas are on {alphas.device} but the masks on {packed.device}")
    return _SuperposedMask.apply(alphas, packed, numel)


def check_alphas(bank: MaskBank, alphas: torch.Tensor) -> None:
    """Raise a clear error unless ``alphas`` is a (T,) floating tensor for a non-empty bank of T tasks."""
    if len(bank) == 0:
        raise ValueError("cannot superpose an empty mask bank: train at least one task first")
    if alphas.shape != (len(bank),) or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a floating tensor of shape ({len(bank)},), one per task in the bank; "
                         f"got {alphas.dtype} {tuple(alphas.shape)}")


def superposed_weights(model: nn.Module, bank: MaskBank, alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Effective weights W ⊙ Σ_t α_t M_t for every masked parameter; differentiable in ``alphas`` (T,).

    The backward gives ∂L/∂α_t = ⟨∂L/∂W_eff ⊙ W, M_t⟩ straight from the packed bank.
    """
    check_alphas(bank, alphas)
    params = maskable_parameters(model)
    return {name: params[name] * superposed_mask(bank.packed(name), numel, alphas).view(params[name].shape)
            for name, numel in bank.numels.items()}
