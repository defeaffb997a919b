"""One validation layer at the public boundary: every wrong input stops here with a sentence.

Public functions of the package call these checks on what a user hands them (images, labels, counts, task
indices, masks, training settings, output paths) before any kernel runs, so a mistake never surfaces as a shape
error deep inside torch, nor as a silently wrong number. Every message names the argument, the value, what was
expected and what to do. The kernels themselves assume checked inputs.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

MNIST_HINT = "normalise raw MNIST pixels as (x / 255 − 0.1307) / 0.3081 (the task streams do this for you)"


def integer(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, refusing bools, floats (2.5, even 2.0) and strings; optionally within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass a whole number")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be ≤ {maximum}, got {value}")
    return value


def optional_integer(name: str, value: object, *, minimum: int | None = None) -> int | None:
    """Like :func:`integer`, but None passes through (e.g. ``num_batches=None``: one epoch)."""
    if value is None:
        return None
    value = integer(name, value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum} or None, got {value}")
    return value


def positive_number(name: str, value: object) -> float:
    """A finite real number > 0 (a learning rate, an angle step that must move): refuses 0, negatives, inf, NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}; give a finite value > 0")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; nothing would change with it")
    return float(value)


def real_number(name: str, value: object) -> float:
    """A finite real number (e.g. degrees per task; 0 and negatives allowed); refuses strings such as "10"."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _first_layer(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return module
    raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to take images")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first layer."""
    return _first_layer(model).weight.dtype


def _flat_images_for(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` starts with an ``nn.Unflatten`` of dim 1 that turns x (B, F) into its image shape."""
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    return (isinstance(first, nn.Unflatten) and first.dim == 1 and x.dim() == 2 and x.shape[0] > 0
            and x.shape[1] == math.prod(first.unflattened_size))


def images(model: nn.Module, x: object, *, name: str = "x") -> torch.Tensor:
    """Check a batch of images for ``model``: a tensor (B, ...) with B ≥ 1, the model's float dtype, the shape its
    first layer takes (784 features, or C channels), on the model's device, every value finite. Returns ``x``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor batch (B, ...), got {type(x).__name__}")
    layer = _first_layer(model)
    if not x.is_floating_point():
        raise TypeError(f"{name} has dtype {x.dtype}, but the model computes in {layer.weight.dtype}: "
                        f"{MNIST_HINT}, then pass {name}.float()")
    if x.dtype != layer.weight.dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, but the model computes in {layer.weight.dtype}; "
                        f"convert with {name}.to({layer.weight.dtype})")
    if isinstance(layer, nn.Linear):
        features = math.prod(x.shape[1:]) if x.dim() >= 2 else -1
        if x.dim() < 2 or features != layer.in_features or x.shape[0] == 0:
            raise ValueError(f"{name} must be a batch (B, {layer.in_features}) with B ≥ 1 (or (B, 28, 28) for "
                             f"MNIST), got shape {tuple(x.shape)}; one image is {name}[None] or {name}[:1]")
    elif _flat_images_for(model, x):
        pass
    elif x.dim() != 4 or x.shape[1] != layer.in_channels or x.shape[0] == 0:
        raise ValueError(f"{name} must be a batch (B, {layer.in_channels}, H, W) with B ≥ 1, got shape "
                         f"{tuple(x.shape)}; one image is {name}[None]")
    if x.device != layer.weight.device:
        raise ValueError(f"{name} is on {x.device} but the model on {layer.weight.device}; move it with "
                         f"{name}.to({str(layer.weight.device)!r})")
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:5].tolist()
        raise ValueError(f"{name} holds NaN or infinite values (images {bad}{' …' if (~finite).sum() > 5 else ''}): "
                         f"no output or task can be inferred from them; drop those images or replace the bad "
                         f"pixels (e.g. torch.nan_to_num)")
    return x


def labels(model: nn.Module, y: object, num: int, *, name: str = "y") -> torch.Tensor:
    """Check labels for ``num`` images of ``model``: int64 (num,), values in [0, model outputs). Returns ``y``."""
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
        raise TypeError(f"{name} must be an int64 tensor (N,) of class indices, got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if y.shape[0] != num:
        raise ValueError(f"need as many labels as images: {num} images, {y.shape[0]} labels in {name}")
    outputs = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1].weight.shape[0]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= outputs):
        raise ValueError(f"{name} holds classes {int(y.min())}..{int(y.max())}, but the model has {outputs} outputs: "
                         f"build the model with at least {int(y.max()) + 1} outputs")
    return y


def masks_fit(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], *, name: str = "masks") -> None:
    """Every mask names a maskable parameter, has exactly its shape (no broadcasting) and holds only 0 and 1."""
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"{name} name parameters the model does not have: {unknown}; it has {sorted(params)}")
    for key, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(mask).__name__}")
        if mask.shape != params[key].shape:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(mask.shape)}, but the weight is "
                             f"{tuple(params[key].shape)}; a mask must have exactly the weight's shape")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}[{key!r}] is not binary (values other than 0 and 1); threshold it, e.g. "
                             f"scores >= 0")


def output_file(name: str, path: str | os.PathLike) -> Path:
    """A file path the package may write: not a directory, its folder creatable and writable. Returns a Path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{name}={str(path)!r} is a directory; give a file path inside it, "
                                f"e.g. {str(path / 'bank.pt')!r}")
    output_folder(f"the folder of {name}", path.parent)
    return path


def output_folder(name: str, path: str | os.PathLike) -> Path:
    """A folder the package may write into: created when missing, refused when a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{name}={str(path)!r} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create {name}={str(path)!r} ({err.strerror}); choose a writable path") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{name}={str(path)!r} is not writable; choose a writable path")
    return path
