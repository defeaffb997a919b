"""Bytes per task of the ways to keep T tasks: SupSup masks bit-packed or sparse, or a dense model per task.

SupSup stores only the base network's seed (8 bytes) and one binary mask per task. Three encodings:

* **bit-packed** (our ``MaskBank``): ⌈P/8⌉ bytes per parameter of P weights, whatever the mask's density;
* **sparse CSC** (what the paper reports, §4.1: "scipy.sparse.csc format with 16 bit integers"): the mask as
  an (out, fan_in) matrix, one 16-bit row index per kept weight plus one pointer per column (+1). The values
  are all 1 and need not be stored. This beats bit-packing only below 1/16 = 6.25 % density;
* **dense fp32**: 4 bytes per parameter of a whole trained model (the upper bound keeps one per task).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .bits import packed_size

SEED_BYTES = 8  # an int64 seed regenerates the frozen base network W
INDEX_BYTES = 2  # 16-bit integers, as the paper stores its CSC masks


def _numel(x: torch.Tensor | torch.Size | tuple[int, ...]) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else math.prod(x)


def bitpacked_bytes(masks: Mapping[str, torch.Tensor | torch.Size | tuple[int, ...]]) -> int:
    """Σ_params ⌈P/8⌉: one task's masks at 1 bit per weight (masks or their shapes)."""
    return sum(packed_size(_numel(m)) for m in masks.values())


def csc_matrix_bytes(mask: torch.Tensor, index_bytes: int = INDEX_BYTES) -> int:
    """Bytes of one mask in compressed-sparse-column form, without values (they are all 1).

    mask: (out, ...) viewed as an (out, fan_in) matrix. Row indices take ``index_bytes`` each (nnz of them);
    the fan_in + 1 column pointers take ``index_bytes`` while nnz fits in it and 4 bytes beyond (a 16-bit
    pointer cannot count past 65,535 kept weights). Row indices need out ≤ 2^(8·index_bytes).
    """
    if mask.dim() < 2:
        raise ValueError(f"a CSC mask needs a weight with ≥ 2 dimensions (out, fan_in, ...), "
                         f"got shape {tuple(mask.shape)}")
    rows, columns = mask.shape[0], math.prod(mask.shape[1:])
    if rows > 2 ** (8 * index_bytes):
        raise ValueError(f"{rows} rows do not fit {8 * index_bytes}-bit row indices")
    nnz = int(torch.count_nonzero(mask))
    pointer_bytes = index_bytes if nnz < 2 ** (8 * index_bytes) else 4
    return index_bytes * nnz + pointer_bytes * (columns + 1)


def sparse_csc_bytes(masks: Mapping[str, torch.Tensor], index_bytes: int = INDEX_BYTES) -> int:
    """One task's masks stored as the paper does (CSC, 16-bit integers): Σ_params ``csc_matrix_bytes``."""
    return sum(csc_matrix_bytes(m, index_bytes) for m in masks.values())


def dense_bytes(parameters: nn.Module | Iterable[torch.Tensor], bytes_per_value: int = 4) -> int:
    """Bytes of a dense model: 4 per fp32 parameter (all parameters of a module, or the tensors given)."""
    tensors = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    return bytes_per_value * sum(t.numel() for t in tensors)


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of weights a task's masks keep: Σ nnz / Σ P."""
    kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
    return kept / sum(m.numel() for m in masks.values())


def bytes_per_task(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """One task's storage in each encoding: SupSup bit-packed, SupSup sparse CSC, a dense fp32 model."""
    return {"SupSup bit-packed": bitpacked_bytes(masks),
            "SupSup sparse CSC (16-bit)": sparse_csc_bytes(masks),
            "dense fp32 model": dense_bytes(model)}


def total_bytes(per_task: int, num_tasks: int, shared: int = SEED_BYTES) -> int:
    """Storage for ``num_tasks`` tasks: ``shared`` bytes once (the base network's seed) plus ``per_task`` each."""
    if num_tasks < 0:
        raise ValueError(f"num_tasks must be ≥ 0, got {num_tasks}")
    return shared + per_task * num_tasks
