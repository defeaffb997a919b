"""Bit packing of binary masks: 1 bit per weight, 8 weights per byte.

Layout (fixed, part of the saved-bank format): element ``i`` of the flattened mask is bit ``i % 8``
(least significant first) of byte ``i // 8``. The last byte is zero-padded.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = [1 << b for b in range(8)]


def packed_size(numel: int) -> int:
    """Bytes needed to hold ``numel`` bits: ⌈numel / 8⌉."""
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a binary mask along its last dimension.

    mask: (..., P) of bool or {0, 1} numbers → (..., ⌈P/8⌉) uint8.
    """
    bits = mask.to(torch.bool)
    numel = bits.shape[-1]
    pad = packed_size(numel) * 8 - numel
    if pad:
        bits = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).to(torch.bool)
    bits = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_bits`. packed: (..., ⌈P/8⌉) uint8 → (..., P) of ``dtype``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed masks must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(numel):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {numel} bits "
                         f"(expected {packed_size(numel)} bytes)")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :numel].to(dtype)
