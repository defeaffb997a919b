"""The CPU kernels of the superposition over packed masks (numba, compiled on first use, cached on disk).

* :func:`compiled` returns ``(counts_kernel, dot_kernel)``; :func:`use_threads` sets numba's thread count to
  torch's. :mod:`supsup_lite.core.superpose` wraps both in its public functions (and has plain torch versions
  for CUDA); nothing else calls them.
* counts (the forward, Σ_t M_t): ``COUNT_ROWS`` rows walked side by side, 64 bytes at a time: eight registers
  of 64-bit lanes count bit k of every byte in byte lanes (``(x >> k) & 0x0101…01``: three vector
  instructions per bit and row for 64 mask bytes), then one shuffle puts the 512 counts in weight order and
  they are added, widened, to the int32 counts. Threads split the columns, so no thread's counts need merging.
* dot products (the backward, ⟨M_t, v⟩ for every requested row t): a 1-bit × float GEMV by **masked adds**.
  One 512-bit register holds L consecutive entries of v (L = 16 float32 or 8 float64) and the matching L mask
  bits are one L-bit word of the row; ``acc += v`` under that mask (one ``vaddps zmm{k}`` on AVX-512: a mask-
  register load and an add per 16 weights) sums exactly the kept entries. ``DOT_ROWS`` rows are walked side
  by side along their whole length, so each register of v is loaded once for all of them and every row is a
  sequential stream the prefetchers follow; two accumulators per row hide the add latency. The masked add is
  written as LLVM vector IR (:func:`_masked_sums`), which LLVM lowers to mask registers on AVX-512 and to
  compare-and-blend on AVX2 or ARM (same results, slower).
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

try:  # the CPU kernels; CUDA needs only torch
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover (numba is a dependency in pyproject.toml)
    numba = None

# numba freezes these when it compiles: never change them at run time
COUNT_ROWS = 32        # counts: rows walked side by side, counted in byte lanes (at most 255: a byte never carries)
COUNT_PREFETCH = 256   # counts: bytes ahead in each row asked for before they are counted (sequential streams)
DOT_ROWS = 8           # dot products: rows walked side by side (8 rows × 2 accumulators + v: 17 of 32 zmm)
DOT_UNROLL = 2         # dot products: accumulators per row (mask words per row per loop step)
DOT_PREFETCH = 256     # dot products: bytes ahead in each row asked for before they are read
DOT_WORDS = 512        # dot products: mask words per call before the float32 lane sums go to float64
_LANE_LOW_BITS = 0x0101010101010101  # bit 0 of each byte of an int64
VECTOR_BITS = 512      # register width the masked adds are written for (LLVM splits it where narrower)


def _prefetch(module):
    """LLVM's prefetch intrinsic (address, read 0 / write 1, locality 0–3, data 1) declared in ``module``."""
    i8_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn_type = ir.FunctionType(ir.VoidType(), [i8_ptr, i32, i32, i32])
    return module.globals.get("llvm.prefetch.p0i8") or ir.Function(module, fn_type, "llvm.prefetch.p0i8")


def _bit_counts(typingctx, flat, offsets, first, rows, chunk_start, chunks, out):
    """Intrinsic: for the ``rows`` rows r (≤ 255) whose bytes start at flat[offsets[first + r]] and each whole
    64-byte chunk c in [chunk_start, chunk_start + chunks): out[8(64c + m) + k] += Σ_r bit k of byte 64c + m of
    row r (int32 counters in the order of the weights).

    Per chunk, eight registers of eight 64-bit lanes count bit k of every byte of the chunk in byte lanes
    (acc_k += (x >> k) & 0x0101…01 per row: a byte lane never carries up to 255 rows); then one shuffle puts the
    512 byte counts in weight order (byte m of acc_k → weight 8m + k), and they are widened and added to ``out``.
    """
    sig = numba.types.void(flat, offsets, numba.types.int64, numba.types.int64, numba.types.int64,
                           numba.types.int64, out)

    def codegen(context, builder, signature, args):
        flat_a, offsets_a, out_a = (context.make_array(signature.args[i])(context, builder, args[i])
                                    for i in (0, 1, 6))
        first, rows, chunk_start, chunks = args[2], args[3], args[4], args[5]
        i64, i32, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(8)
        lanes_t = ir.VectorType(i64, 8)
        const = lambda value: ir.Constant(i64, value)  # noqa: E731
        low_bits = ir.Constant(lanes_t, [ir.Constant(i64, _LANE_LOW_BITS)] * 8)
        zero = ir.Constant(lanes_t, None)
        entry = builder.block
        chunk_loop, row_loop = builder.append_basic_block("counts.chunk"), builder.append_basic_block("counts.row")
        flush, done = builder.append_basic_block("counts.flush"), builder.append_basic_block("counts.done")
        builder.cbranch(builder.and_(builder.icmp_signed(">", chunks, const(0)),
                                     builder.icmp_signed(">", rows, const(0))), chunk_loop, done)
        builder.position_at_end(chunk_loop)
        c = builder.phi(i64)
        c.add_incoming(chunk_start, entry)
        builder.branch(row_loop)
        builder.position_at_end(row_loop)
        r = builder.phi(i64)
        acc = [builder.phi(lanes_t) for _ in range(8)]
        start = builder.add(builder.load(builder.gep(offsets_a.data, [builder.add(first, r)])),
                            builder.mul(c, const(64)))
        row_bytes = builder.gep(flat_a.data, [start])
        x = builder.load(builder.bitcast(row_bytes, lanes_t.as_pointer()), align=1)
        hint = [ir.Constant(i32, value) for value in (0, 3, 1)]  # read, keep in all caches, data
        builder.call(_prefetch(builder.module), [builder.gep(row_bytes, [const(COUNT_PREFETCH)]), *hint])
        new = [builder.add(acc[k], builder.and_(builder.lshr(x, ir.Constant(lanes_t, [ir.Constant(i64, k)] * 8)),
                                                low_bits)) for k in range(8)]
        next_r = builder.add(r, const(1))
        r.add_incoming(const(0), chunk_loop)
        r.add_incoming(next_r, row_loop)
        for k in range(8):
            acc[k].add_incoming(zero, chunk_loop)
            acc[k].add_incoming(new[k], row_loop)
        builder.cbranch(builder.icmp_signed("<", next_r, rows), row_loop, flush)
        builder.position_at_end(flush)
        parts = [builder.bitcast(v, ir.VectorType(i8, 64)) for v in new]  # parts[k][m]: bit k of byte m
        while len(parts) > 1:  # concatenate: element 64k + m
            width = parts[0].type.count
            both = [ir.Constant(i32, i) for i in range(2 * width)]
            parts = [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 2 * width), both))
                     for a, b in zip(parts[::2], parts[1::2])]
        order = ir.Constant(ir.VectorType(i32, 512), [ir.Constant(i32, (t % 8) * 64 + t // 8) for t in range(512)])
        by_weight = builder.shuffle_vector(parts[0], ir.Constant(parts[0].type, None), order)
        wide_t = ir.VectorType(i32, 512)
        ptr = builder.bitcast(builder.gep(out_a.data, [builder.mul(c, const(512))]), wide_t.as_pointer())
        builder.store(builder.add(builder.load(ptr, align=4), builder.zext(by_weight, wide_t)), ptr, align=4)
        next_c = builder.add(c, const(1))
        c.add_incoming(next_c, flush)
        builder.cbranch(builder.icmp_signed("<", next_c, builder.add(chunk_start, chunks)), chunk_loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


def _counts_kernel(packed: np.ndarray, rows: np.ndarray, out: np.ndarray,
                   threads: int) -> None:  # pragma: no cover (numba)
    """out[8j + k] += Σ_{t ∈ rows} bit k of packed[t, j]. packed (T, n) uint8 C-contiguous, rows (r,) int64, out
    (8n,) int32, threads: numba's thread count.

    Each of the ``threads`` threads takes a run of whole 64-byte chunks of the columns and walks groups of
    ``COUNT_ROWS`` rows side by side along it (:func:`_bit_counts`: sequential streams, one register per bit of a
    chunk), adding straight into its own part of ``out``; the last thread also counts the tail bytes after the
    last whole chunk, bit by bit.
    """
    num_bytes = packed.shape[1]
    flat = packed.reshape(-1)
    offsets = rows * num_bytes
    num_rows = rows.shape[0]
    chunks = num_bytes // 64
    per_thread = (chunks + threads - 1) // threads
    for h in numba.prange(threads):
        start = min(chunks, h * per_thread)
        count = min(chunks, start + per_thread) - start
        for first in range(0, num_rows, COUNT_ROWS):
            _bit_counts_of_rows(flat, offsets, first, min(num_rows, first + COUNT_ROWS) - first, start, count, out)
        if h == threads - 1:
            for r in range(num_rows):
                for j in range(64 * chunks, num_bytes):
                    byte = flat[offsets[r] + j]
                    for k in range(8):
                        out[8 * j + k] += (byte >> k) & 1


def _masked_sums(num_rows: int):
    """An intrinsic ``f(flat, offsets, first, col, vector, words, sums)`` over ``num_rows`` rows r (unrolled):

    sums[(first + r)·L + l] += Σ_{i < words} bit l of word (col + i) of row r · vector[(col + i)·L + l], l < L,

    where row r's bytes start at flat[offsets[first + r]], a word is L bits (L = 512 / the vector's bits per
    entry: 16 for float32, 8 for float64), ``words`` is a multiple of ``DOT_UNROLL`` (0 allowed) and sums is
    float64. Lane sums run in the vector's dtype for one call, then are added to ``sums``.
    """

    @intrinsic
    def masked_sums(typingctx, flat, offsets, first, col, vector, words, sums):
        sig = numba.types.void(flat, offsets, numba.types.int64, numba.types.int64, vector, numba.types.int64, sums)

        def codegen(context, builder, signature, args):
            flat_a, offsets_a, vector_a, sums_a = (context.make_array(signature.args[i])(context, builder, args[i])
                                                   for i in (0, 1, 4, 6))
            first_i, col_i, words_i = args[2], args[3], args[5]
            scalar = context.get_value_type(signature.args[4].dtype)
            entry_bits = signature.args[4].dtype.bitwidth
            lanes = VECTOR_BITS // entry_bits
            i64, f64 = ir.IntType(64), ir.DoubleType()
            vec_t, mask_t, word_t = ir.VectorType(scalar, lanes), ir.VectorType(ir.IntType(1), lanes), ir.IntType(lanes)
            sum_t = ir.VectorType(f64, lanes)
            const = lambda value: ir.Constant(i64, value)  # noqa: E731
            vec_start = builder.gep(vector_a.data, [builder.mul(col_i, const(lanes))])
            vec_p = builder.bitcast(vec_start, vec_t.as_pointer())
            row_p, sum_p = [], []
            for r in range(num_rows):
                row = builder.add(first_i, const(r))
                start = builder.add(builder.load(builder.gep(offsets_a.data, [row])),
                                    builder.mul(col_i, const(lanes // 8)))
                row_p.append(builder.bitcast(builder.gep(flat_a.data, [start]), word_t.as_pointer()))
                row_sums = builder.gep(sums_a.data, [builder.mul(row, const(lanes))])
                sum_p.append(builder.bitcast(row_sums, sum_t.as_pointer()))
            zero = ir.Constant(vec_t, None)
            hint = [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)]  # read, keep in all caches, data
            entry = builder.block
            loop, done = builder.append_basic_block("masked_sums.loop"), builder.append_basic_block("masked_sums.done")
            builder.cbranch(builder.icmp_signed(">", words_i, const(0)), loop, done)
            builder.position_at_end(loop)
            i = builder.phi(i64)
            acc = [[builder.phi(vec_t) for _ in range(DOT_UNROLL)] for _ in range(num_rows)]
            new = [[None] * DOT_UNROLL for _ in range(num_rows)]
            for u in range(DOT_UNROLL):
                word = builder.add(i, const(u))
                v = builder.load(builder.gep(vec_p, [word]), align=entry_bits // 8)
                for r in range(num_rows):
                    if u == 0:  # ask for the row's bytes DOT_PREFETCH ahead (a hint: never faults past the end)
                        here = builder.bitcast(builder.gep(row_p[r], [word]), ir.IntType(8).as_pointer())
                        builder.call(_prefetch(builder.module), [builder.gep(here, [const(DOT_PREFETCH)]), *hint])
                    mask = builder.bitcast(builder.load(builder.gep(row_p[r], [word]), align=1), mask_t)
                    new[r][u] = builder.select(mask, builder.fadd(acc[r][u], v), acc[r][u])  # acc += v where kept
            step = builder.add(i, const(DOT_UNROLL))
            i.add_incoming(const(0), entry)
            i.add_incoming(step, loop)
            for r in range(num_rows):
                for u in range(DOT_UNROLL):
                    acc[r][u].add_incoming(zero, entry)
                    acc[r][u].add_incoming(new[r][u], loop)
            builder.cbranch(builder.icmp_signed("<", step, words_i), loop, done)
            builder.position_at_end(done)
            final = [[builder.phi(vec_t) for _ in range(DOT_UNROLL)] for _ in range(num_rows)]
            for r in range(num_rows):
                for u in range(DOT_UNROLL):
                    final[r][u].add_incoming(zero, entry)
                    final[r][u].add_incoming(new[r][u], loop)
            for r in range(num_rows):
                total = final[r][0]
                for u in range(1, DOT_UNROLL):
                    total = builder.fadd(total, final[r][u])
                total = builder.fpext(total, sum_t) if scalar != f64 else total
                builder.store(builder.fadd(builder.load(sum_p[r], align=8), total), sum_p[r], align=8)
            return context.get_dummy_value()

        return sig, codegen

    return masked_sums


if numba is not None:
    _bit_counts_of_rows = intrinsic(_bit_counts)
    _masked_sums_of_group = _masked_sums(DOT_ROWS)
    _masked_sums_of_row = _masked_sums(1)


def _dot_kernel(packed: np.ndarray, rows: np.ndarray, vector: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover (numba)
    """out[r] = Σ_j bit (j mod 8) of packed[rows[r], j // 8] · vector[j] = ⟨M_{rows[r]}, v⟩.

    packed (T, n) uint8 C-contiguous, rows (k,) int64, vector (P,) float32 or float64 with 8(n − 1) < P ≤ 8n,
    out (k,) float64 (bits past P are ignored). Groups of ``DOT_ROWS`` rows run in parallel; each walks its rows
    ``DOT_WORDS`` mask words at a time with :func:`_masked_sums` (whole words that lie inside the vector), then
    adds its lane sums and the remaining bits one at a time.
    """
    num_bytes = packed.shape[1]
    flat = packed.reshape(-1)
    offsets = rows * num_bytes
    num_rows = rows.shape[0]
    lanes = VECTOR_BITS // (8 * vector.itemsize)
    words = vector.shape[0] // lanes // DOT_UNROLL * DOT_UNROLL
    sums = np.zeros(num_rows * lanes)
    for group in numba.prange((num_rows + DOT_ROWS - 1) // DOT_ROWS):
        first = group * DOT_ROWS
        last = min(num_rows, first + DOT_ROWS)
        for col in range(0, words, DOT_WORDS):
            n = min(words, col + DOT_WORDS) - col
            if last - first == DOT_ROWS:
                _masked_sums_of_group(flat, offsets, first, col, vector, n, sums)
            else:
                for r in range(first, last):
                    _masked_sums_of_row(flat, offsets, r, col, vector, n, sums)
        for r in range(first, last):
            total = 0.0
            for lane in range(lanes):
                total += sums[r * lanes + lane]
            for j in range(words * lanes // 8, num_bytes):
                byte = flat[offsets[r] + j]
                for k in range(min(8, vector.shape[0] - 8 * j)):
                    if (byte >> k) & 1:
                        total += vector[8 * j + k]
            out[r] = total


@lru_cache(maxsize=None)
def compiled() -> tuple:
    """``(counts_kernel, dot_kernel)``, compiled lazily on first use (cached on disk by numba)."""
    if numba is None:
        raise ImportError("superposing a mask bank on CPU needs numba (a dependency of supsup-lite): pip install numba")
    if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
        # OpenMP first: numba then runs on the libgomp that torch has already loaded, i.e. on torch's own pool.
        # Any other pool competes with torch's OpenMP workers, which keep spinning for milliseconds after each
        # torch operation (measured: the dot products ran 1.6x slower on numba's workqueue after a torch copy).
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the threading layer, which under OpenMP resets torch's thread count
    torch.set_num_threads(threads)
    jit = numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)
    return jit(_counts_kernel), jit(_dot_kernel)


def use_threads() -> int:
    """Run numba kernels on as many threads as torch uses (at most numba's pool); returns that number."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads
