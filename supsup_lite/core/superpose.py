"""Superposed weights W ⊙ Σ_t α_t M_t over the bit-packed mask bank (the paper's Eq. 2).

The bank holds T binary masks per parameter as packed bytes (T, ⌈P/8⌉) (1 bit per weight). The superposed
mask S(α) = Σ_t α_t M_t and its gradient ∂L/∂α_t = ⟨∂L/∂S, M_t⟩ are computed block by block straight from the
packed bytes, never holding T float masks (the authors' code stacks all T masks in float32: 32 × the bytes):

* forward: tasks that share one α value are *counted*: Σ_{t: α_t = v} M_t is a per-weight popcount, done eight
  bytes at a time in 64-bit lanes (one byte lane per mask byte, flushed every 255 rows so a lane never carries);
  S = Σ_v v · count_v. One-Shot (α = 1/T) and binary search (α uniform on the candidates) need one count, and
  the count of the first k tasks is cached per bank version (:func:`uniform_counts`).
* backward: for every byte column j, a table G_j[v] = Σ_k bit_k(v) · g_{8j+k} of the 256 byte values, then
  ∂L/∂α_t = Σ_j G_j[byte_{t,j}]: one table lookup per stored byte (a 1-bit × float GEMV in the spirit of
  T-MAC), a block of columns at a time so the tables stay in cache, a tile of rows at a time so each word's
  tables are reused by every row of the tile.

On CPU both passes are numba kernels (compiled on first use, cached on disk, one thread per torch thread); on
CUDA they are plain torch (:func:`mask_counts_torch`, :func:`masks_dot_torch`). Up to ``DENSE_MAX_TASKS`` masks
(per device type) are simply unpacked to floats (cheaper for few tasks). Extra memory is a table or a count per
block of columns, independent of T.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from .bits import packed_size, unpack_bits
from .masks import MaskBank
from .models import maskable_parameters

try:  # the CPU kernels; CUDA needs only torch
    import numba
except ImportError:  # pragma: no cover (numba is a dependency in pyproject.toml)
    numba = None

# CPU kernels (numba freezes these when it compiles: never change them at run time)
ROWS_PER_FLUSH = 255   # rows summed in uint64 lanes before a flush: 255 · 1 per byte lane fits the byte
COUNT_WORDS = 512      # 8-byte words per column block of the count (8 bits · 512 words · 8 bytes: 32 KB)
DOT_BLOCK = 512        # packed bytes per column block of the gradient (tables: 512 KB of float32, in L2; rows
                       # are copied 512 bytes at a time, long enough for the prefetcher)
DOT_ROWS = 64          # rows per tile of the gradient (a 32 KB tile walked word by word across its rows)
# CUDA (plain torch)
ROWS_PER_COUNT = 127   # rows summed in one int64 pass: 127 · 1 per byte lane never reaches the sign bit
COLUMN_BLOCK = 4096    # packed bytes per block in the count (a multiple of 8)
TABLE_BLOCK = 256      # packed bytes per block in the gradient (table: 256 × 256 values)
GATHER_ROWS = 4096     # tasks per block in the gradient
# up to this many masks, unpacking them to floats is cheaper than the kernels (CPU, LeNet 300-100: the numba
# gradient costs ~1.5 ms + 0.014 ms per mask, unpacking ~0.3 ms per mask; CUDA: one launch unpacks them all)
DENSE_MAX_TASKS = {"cpu": 4, "cuda": 24}
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


# --- CPU kernels (numba) ---------------------------------------------------------------------------------------
def _counts_kernel(packed: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (numba)
    """out[8j + k] += Σ_{t ∈ rows} bit k of packed[t, j]. packed (T, n) uint8, rows (r,) int64, out (8n,) int32.

    Column blocks of ``COUNT_WORDS`` 8-byte words run in parallel; in each, lane m of acc[k, i] counts bit k of
    byte 8i + m over up to ``ROWS_PER_FLUSH`` rows (vectorised over i), then is flushed into ``out``.
    """
    num_bytes = packed.shape[1]
    words = num_bytes // 8
    blocks = (words + COUNT_WORDS - 1) // COUNT_WORDS
    for block in numba.prange(blocks + 1):
        if block == blocks:  # the bytes after the last whole word, one bit at a time
            for j in range(8 * words, num_bytes):
                for r in range(rows.shape[0]):
                    byte = packed[rows[r], j]
                    for k in range(8):
                        out[8 * j + k] += (byte >> k) & 1
            continue
        w0 = block * COUNT_WORDS
        n = min(words, w0 + COUNT_WORDS) - w0
        acc = np.zeros((8, n), np.uint64)
        for start in range(0, rows.shape[0], ROWS_PER_FLUSH):
            for r in range(start, min(rows.shape[0], start + ROWS_PER_FLUSH)):
                lanes = packed[rows[r], 8 * w0:8 * (w0 + n)].view(np.uint64)
                for k in range(8):
                    for i in range(n):
                        acc[k, i] += (lanes[i] >> np.uint64(k)) & np.uint64(_LANE_LOW_BITS)
            for k in range(8):
                for i in range(n):
                    lane = acc[k, i]
                    for m in range(8):
                        out[8 * (8 * (w0 + i) + m) + k] += np.int32((lane >> np.uint64(8 * m)) & np.uint64(255))
                    acc[k, i] = 0


def _dot_kernel(packed: np.ndarray, rows: np.ndarray, vector: np.ndarray, tables: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover (numba)
    """out[h, r] = Σ over the column blocks of thread h of Σ_j G_j[packed[rows[r], j]], G_j[v] = Σ_k bit_k(v) v_{8j+k}.

    packed (T, n) uint8, rows (r,) int64, vector (8n,) zero-padded, tables (H, DOT_BLOCK·256) scratch of the
    vector's dtype, out (H, r) float64 zeros: thread h takes the h-th run of column blocks; Σ_h out[h] = ⟨M_t, v⟩.
    Per column block: build the tables, then copy ``DOT_ROWS`` rows at a time into a small tile and walk it word
    by word (8 bytes, eight lookups), all rows of the tile at each word, so the 8 KB of tables a word needs stay
    in L1 while the tile's rows use them.
    """
    num_bytes = packed.shape[1]
    threads = out.shape[0]
    blocks = (num_bytes + DOT_BLOCK - 1) // DOT_BLOCK
    per_thread = (blocks + threads - 1) // threads
    for h in numba.prange(threads):
        table = tables[h]
        part = out[h]
        tile = np.zeros((DOT_ROWS, DOT_BLOCK), np.uint8)
        acc = np.zeros(DOT_ROWS, table.dtype)
        lanes = tile.reshape(-1).view(np.uint64).reshape(DOT_ROWS, DOT_BLOCK // 8)
        for block in range(h * per_thread, min(blocks, (h + 1) * per_thread)):
            c0 = block * DOT_BLOCK
            width = min(num_bytes, c0 + DOT_BLOCK) - c0
            for j in range(width):  # G_j[v + 2^k] = G_j[v] + v_{8j+k} for v < 2^k
                base = 256 * j
                table[base] = 0
                for k in range(8):
                    weight = vector[8 * (c0 + j) + k]
                    for v in range(1 << k):
                        table[base + (1 << k) + v] = table[base + v] + weight
            whole = width // 8
            for r0 in range(0, rows.shape[0], DOT_ROWS):
                n = min(rows.shape[0], r0 + DOT_ROWS) - r0
                for r in range(n):
                    tile[r, :width] = packed[rows[r0 + r], c0:c0 + width]
                    acc[r] = 0
                for i in range(whole):
                    base = 2048 * i
                    for r in range(n):
                        word = lanes[r, i]
                        acc[r] += (((table[base + (word & 255)] + table[base + 256 + ((word >> 8) & 255)])
                                    + (table[base + 512 + ((word >> 16) & 255)]
                                       + table[base + 768 + ((word >> 24) & 255)]))
                                   + ((table[base + 1024 + ((word >> 32) & 255)]
                                       + table[base + 1280 + ((word >> 40) & 255)])
                                      + (table[base + 1536 + ((word >> 48) & 255)] + table[base + 1792 + (word >> 56)])))
                for r in range(n):
                    for j in range(8 * whole, width):
                        acc[r] += table[256 * j + tile[r, j]]
                    part[r0 + r] += acc[r]


@lru_cache(maxsize=None)
def _cpu_kernels() -> tuple:
    """The numba-compiled CPU kernels (compiled lazily on first use, cached on disk)."""
    if numba is None:
        raise ImportError("superposing a mask bank on CPU needs numba (a dependency of supsup-lite): pip install numba")
    if "NUMBA_THREADING_LAYER" not in os.environ:  # numba's OpenMP workers keep spinning after a call and
        numba.config.THREADING_LAYER = "workqueue"  # compete with torch's threads for the same few cores
    jit = numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    return jit(_counts_kernel), jit(_dot_kernel)


def _cpu_threads() -> int:
    """Run numba kernels on as many threads as torch uses (at most numba's pool)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


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


# --- the two passes --------------------------------------------------------------------------------------------
def mask_counts(packed: torch.Tensor, numel: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight number of selected masks that keep it: Σ_{t ∈ rows} M_t, exact, as int32 (P,).

    packed: (T, ⌈P/8⌉) uint8; rows: (k,) int64 task indices (default: all). CPU: numba kernel; CUDA:
    :func:`mask_counts_torch`.
    """
    if packed.device.type != "cpu":
        return mask_counts_torch(packed, numel, rows)
    rows = _task_rows(packed.shape[0], rows)
    counts_kernel, _ = _cpu_kernels()
    out = torch.zeros(8 * packed.shape[1], dtype=torch.int32)
    _cpu_threads()
    counts_kernel(packed.contiguous().numpy(), rows.cpu().numpy(), out.numpy())
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

    Byte-table method: G_j[v] = Σ_k bit_k(v) · v_{8j+k} for all 256 byte values v, then Σ_j G_j[byte_{t,j}]
    (CPU: numba kernel; CUDA: :func:`masks_dot_torch`). Up to ``DENSE_MAX_TASKS`` rows are unpacked instead.
    """
    num_rows, num_bytes = packed.shape
    if (num_rows if rows is None else rows.numel()) <= dense_max_tasks(packed.device):
        selected = packed if rows is None else packed.index_select(0, rows.to(packed.device))
        return unpack_float(selected, numel, vector.dtype) @ vector
    if packed.device.type != "cpu":
        return masks_dot_torch(packed, numel, vector, rows)
    rows = _task_rows(num_rows, rows)
    _, dot_kernel = _cpu_kernels()
    threads = _cpu_threads()
    padded = torch.nn.functional.pad(vector.detach(), (0, 8 * num_bytes - numel)).contiguous()
    tables = torch.empty(threads, 256 * DOT_BLOCK, dtype=vector.dtype)
    out = torch.zeros(threads, rows.numel(), dtype=torch.float64)
    dot_kernel(packed.contiguous().numpy(), rows.numpy(), padded.numpy(), tables.numpy(), out.numpy())
    return out.sum(0).to(vector.dtype)


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
