"""Superposed weights W ⊙ Σ_t α_t M_t over the bit-packed mask bank (the paper's Eq. 2)."""
from __future__ import annotations

import torch
from torch import nn

from .bits import unpack_bits
from .masks import MaskBank
from .models import maskable_parameters


def superposed_mask_reference(packed: torch.Tensor, numel: int, alphas: torch.Tensor) -> torch.Tensor:
    """Plain reference: unpack all T masks to floats, then Σ_t α_t M_t.

    packed: (T, ⌈P/8⌉) uint8, alphas: (T,) → (P,). Peak extra memory O(T·P) floats.
    """
    masks = unpack_bits(packed, numel, alphas.dtype)
    return alphas @ masks


def check_alphas(bank: MaskBank, alphas: torch.Tensor) -> None:
    """Raise a clear error unless ``alphas`` is a (T,) floating tensor for a non-empty bank of T tasks."""
    if len(bank) == 0:
        raise ValueError("cannot superpose an empty mask bank: train at least one task first")
    if alphas.shape != (len(bank),) or not alphas.is_floating_point():
        raise ValueError(f"alphas must be a floating tensor of shape ({len(bank)},), one per task in the bank; "
                         f"got {alphas.dtype} {tuple(alphas.shape)}")


def superposed_weights(model: nn.Module, bank: MaskBank, alphas: torch.Tensor) -> dict[str, torch.Tensor]:
    """Effective weights W ⊙ Σ_t α_t M_t for every masked parameter; differentiable in ``alphas`` (T,)."""
    check_alphas(bank, alphas)
    params = maskable_parameters(model)
    return {name: params[name] * superposed_mask_reference(bank.packed(name), numel, alphas).view(params[name].shape)
            for name, numel in bank.numels.items()}
