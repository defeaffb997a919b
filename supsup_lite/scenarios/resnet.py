"""The paper's GEM ResNet-18 for SplitCIFAR100, its Erdős–Rényi mask densities, and per-task BatchNorm.

GEM ResNet-18 ("ResNet-18 with fewer channels", the authors' ``models/gemresnet.py``): a 3×3 stem with
stride 1, BasicBlocks [2, 2, 2, 2] of widths w, 2w, 4w, 8w (w = 20), a 1×1-conv shortcut where the shape
changes, 4×4 average pooling and a 1×1-conv head. Every conv is bias-free and maskable (≈1.09M weights).

The BatchNorm layers are non-affine (no γ, β to train) and their running statistics are *data*, like the
masks: :func:`batchnorm_stats` makes a fresh set of buffers, and a forward passes one task's buffers next to
its masked weights through ``torch.func.functional_call``. In training mode the call updates exactly the
buffers it was given, so each task owns its statistics and training task t leaves every earlier task's
forward untouched. Sharing one set of buffers between tasks (the authors' ``NonAffineBN``) silently
re-normalises every earlier mask's activations with the statistics of the latest one (RAIVNLab/supsup issues
#11 and #15; their later `MultitaskNonAffineBN` in `models/modules.py` fixed it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import resolve_device
from ..core.models import maskable_parameters, signed_constant_

ARCH = "gem_resnet18"
GEM_WIDTH = 20
BLOCKS_PER_STAGE = (2, 2, 2, 2)
MAX_ER_DENSITY = 0.5

Buffers = dict[str, torch.Tensor]


def non_affine_batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm over ``channels`` with running statistics and no learnable scale or shift."""
    return nn.BatchNorm2d(channels, affine=False)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3×3 convolution, padding 1, no bias."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution, no padding, no bias."""
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); shortcut = bn(conv1×1(x)) on a shape change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = non_affine_batchnorm(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = non_affine_batchnorm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv1x1(c_in, c_out, stride), non_affine_batchnorm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GEMResNet18(nn.Module):
    """GEM ResNet-18 on 32×32 RGB images: x (B, 3, 32, 32) → logits (B, num_outputs)."""

    def __init__(self, num_outputs: int = 5, width: int = GEM_WIDTH) -> None:
        super().__init__()
        if num_outputs < 1 or width < 1:
            raise ValueError(f"num_outputs and width must be ≥ 1, got num_outputs={num_outputs}, width={width}")
        self.conv1 = conv3x3(3, width)
        self.bn1 = non_affine_batchnorm(width)
        stages, c_in = [], width
        for stage, blocks in enumerate(BLOCKS_PER_STAGE):
            c_out = width * 2 ** stage
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layers = []
            for stride in strides:
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = conv1x1(c_in, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"GEMResNet18 expects images (B, 3, 32, 32), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.linear(F.avg_pool2d(out, 4))
        return out.flatten(1)


def gem_resnet18(num_outputs: int = 5, width: int = GEM_WIDTH) -> GEMResNet18:
    """A fresh (not yet frozen) GEM ResNet-18 with base width ``width`` (the paper's is 20)."""
    return GEMResNet18(num_outputs, width)


def frozen_gem_resnet18(num_outputs: int = 5, width: int = GEM_WIDTH, seed: int = 0,
                        device: torch.device | str | None = None) -> GEMResNet18:
    """GEM ResNet-18 frozen as a signed-constant network (±√(2/fan_in), seeded), on ``device``, in eval mode."""
    model = gem_resnet18(num_outputs, width)
    signed_constant_(model, torch.Generator().manual_seed(seed))
    model.arch, model.base_seed = ARCH, seed
    return model.to(resolve_device(device)).eval()


SMALL_CONVNET = "small_convnet"


def frozen_small_convnet(num_outputs: int = 10, width: int = 16, seed: int = 0,
                         device: torch.device | str | None = None) -> nn.Sequential:
    """A CPU-sized conv net for MNIST streams with non-affine BatchNorm, frozen as a signed-constant network.

    x (B, 784) → (B, 1, 28, 28) → three blocks conv3×3 (stride 2, bias-free) → BatchNorm → ReLU with ``width``,
    2·``width``, 4·``width`` channels (14², 7², 4² pixels) → global average pool → bias-free linear head →
    logits (B, ``num_outputs``). Used to show why BatchNorm statistics must be per task (notebook 02).
    """
    if num_outputs < 1 or width < 1:
        raise ValueError(f"num_outputs and width must be ≥ 1, got num_outputs={num_outputs}, width={width}")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 28, 28))]
    c_in = 1
    for c_out in (width, 2 * width, 4 * width):
        layers += [conv3x3(c_in, c_out, stride=2), non_affine_batchnorm(c_out), nn.ReLU()]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_outputs, bias=False)]
    model = nn.Sequential(*layers)
    signed_constant_(model, torch.Generator().manual_seed(seed))
    model.arch, model.base_seed = SMALL_CONVNET, seed
    return model.to(resolve_device(device)).eval()


def er_density(shape: torch.Size | tuple[int, ...], budget: float) -> float:
    """Erdős–Rényi kept fraction of a layer: min(0.5, budget · (c_out + c_in) / (c_out · c_in · k_h · k_w)).

    shape: a conv weight (c_out, c_in, k_h, k_w) or a linear weight (c_out, c_in). ``budget`` is the
    authors' integer ``--sparsity`` with ``--er-sparsity`` (1 … 32; higher keeps more weights).
    """
    if not budget > 0:
        raise ValueError(f"the ER budget must be > 0 (the paper uses 1, 2, 4, 8, 16, 32), got {budget}")
    if len(shape) not in (2, 4):
        raise ValueError(f"er_density expects a (c_out, c_in) or (c_out, c_in, k_h, k_w) weight, got {tuple(shape)}")
    c_out, c_in = shape[0], shape[1]
    return min(MAX_ER_DENSITY, budget * (c_out + c_in) / math.prod(shape))


def er_densities(model: nn.Module, budget: float) -> dict[str, float]:
    """:func:`er_density` of every maskable weight of ``model``, by parameter name (first and last included)."""
    return {name: er_density(weight.shape, budget) for name, weight in maskable_parameters(model).items()}


def kept_weights(model: nn.Module, densities: dict[str, float]) -> int:
    """Weights a top-k mask keeps: Σ_layers n − ⌊(1 − d)·n⌋ (the rounding of ``topk_supermask``)."""
    params = maskable_parameters(model)
    return sum(p.numel() - int((1.0 - densities[n]) * p.numel()) for n, p in params.items())


def batchnorm_stats(model: nn.Module) -> Buffers:
    """A fresh set of BatchNorm buffers for one task: running_mean 0, running_var 1, num_batches_tracked 0.

    Keys are ``model``'s buffer names (``layer1.0.bn1.running_mean`` …), so the dict can be merged with masked
    weights and passed to ``functional_call``; in training mode the forward updates these tensors in place.
    """
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not module.track_running_stats:
                raise ValueError(f"BatchNorm {name!r} keeps no running statistics; per-task stats need them")
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                stats[f"{name}.{buffer}"] = getattr(module, buffer).detach().clone()
            stats[f"{name}.running_mean"].zero_()
            stats[f"{name}.running_var"].fill_(1.0)
            stats[f"{name}.num_batches_tracked"].zero_()
    return stats
