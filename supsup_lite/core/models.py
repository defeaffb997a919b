"""Base networks and their signed-constant freezing.

A SupSup model is a frozen random base network plus masks that are *data*: the base stays a plain
``nn.Module`` and a forward with masks swaps effective weights in through ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..config import resolve_device

MASKABLE_LAYERS = (nn.Linear, nn.Conv2d)


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=False))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet_300_100(num_outputs: int = 10) -> nn.Sequential:
    """LeNet 300-100 of the paper: 784 → 300 → 100 → s, ReLU, no biases."""
    return _mlp([784, 300, 100, num_outputs])


def fc_1024_1024(num_outputs: int = 10) -> nn.Sequential:
    """FC 1024-1024 of the paper: 784 → 1024 → 1024 → s, ReLU, no biases."""
    return _mlp([784, 1024, 1024, num_outputs])


def fc_1000_1000(num_outputs: int = 10) -> nn.Sequential:
    """van de Ven & Tolias' permuted-MNIST MLP (without biases): 784 → 1000 → 1000 → s, ReLU."""
    return _mlp([784, 1000, 1000, num_outputs])


def fc_400_400(num_outputs: int = 10) -> nn.Sequential:
    """van de Ven & Tolias' split-MNIST MLP (without biases): 784 → 400 → 400 → s, ReLU."""
    return _mlp([784, 400, 400, num_outputs])


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "lenet_300_100": lenet_300_100,
    "fc_1024_1024": fc_1024_1024,
    "fc_1000_1000": fc_1000_1000,
    "fc_400_400": fc_400_400,
}


def build_model(arch: str, num_outputs: int = 10) -> nn.Module:
    """A fresh (not yet frozen) base network by name; see ``ARCHITECTURES``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be ≥ 1, got {num_outputs}")
    return ARCHITECTURES[arch](num_outputs)


def maskable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every Linear / Conv2d layer, by qualified name, in module order."""
    return {f"{name}.weight" if name else "weight": module.weight
            for name, module in model.named_modules() if isinstance(module, MASKABLE_LAYERS)}


def output_size(model: nn.Module) -> int:
    """Outputs of the last maskable layer (the head of every network in this package)."""
    return list(maskable_parameters(model).values())[-1].shape[0]


def fan_in(weight: torch.Tensor) -> int:
    """Inputs feeding one output unit: in_features, or in_channels · k_h · k_w for a conv."""
    return math.prod(weight.shape[1:])


def signed_constant_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Freeze ``model`` as the paper's signed-constant network, in place.

    Every maskable weight becomes ±c with c = sqrt(2 / fan_in) (the std of Kaiming normal with ReLU gain),
    signs drawn independently with probability ½ from ``generator``; biases are zeroed. Nothing requires grad.
    """
    with torch.no_grad():
        for weight in maskable_parameters(model).values():
            signs = torch.randint(0, 2, weight.shape, generator=generator).to(weight) * 2 - 1
            weight.copy_(signs * math.sqrt(2.0 / fan_in(weight)))
        for module in model.modules():
            if isinstance(module, MASKABLE_LAYERS) and module.bias is not None:
                module.bias.zero_()
    model.requires_grad_(False)
    return model


def frozen_random_model(arch: str, num_outputs: int = 10, seed: int = 0,
                        device: torch.device | str | None = None) -> nn.Module:
    """``build_model`` + ``signed_constant_`` with ``torch.Generator().manual_seed(seed)``, on ``device``."""
    model = build_model(arch, num_outputs)
    signed_constant_(model, torch.Generator().manual_seed(seed))
    model.arch, model.base_seed = arch, seed  # recorded in the NetworkFingerprint of banks made for it
    return model.to(resolve_device(device)).eval()


def masked_forward(model: nn.Module, weights: dict[str, torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    """Forward ``x`` through ``model`` with some parameters replaced by ``weights`` (e.g. W ⊙ M).

    x: (B, ...) → logits (B, s). ``weights=None`` uses the model's own parameters. Anything a module holds
    (BatchNorm buffers too) can be swapped in by name.
    """
    return model(x) if not weights else functional_call(model, weights, (x,))


def batched_masked_forward(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """K masked forwards in one: logits[k] = ``masked_forward(model, {n: w[k]}, x[k])``.

    weights: name → (K, *shape); x: (K, B, ...) → logits (K, B, s). ``torch.func.vmap`` over
    ``functional_call`` turns a linear layer into one ``bmm`` over the (K, out, in) stack and a conv into a
    grouped convolution. K = 1 skips ``vmap`` (same values, less per-call overhead).
    """
    if x.shape[0] == 1:
        return masked_forward(model, {name: w[0] for name, w in weights.items()}, x[0]).unsqueeze(0)
    return vmap(lambda w, xb: functional_call(model, w, (xb,)))(weights, x)
