"""Supermasks: score initialisation, straight-through mask functions, and the bit-packed ``MaskBank``."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from .bits import pack_bits, packed_size, unpack_bits
from .models import maskable_parameters

Masks = dict[str, torch.Tensor]


def init_scores(model: nn.Module, generator: torch.Generator) -> Masks:
    """One real score per maskable weight, ``kaiming_uniform_(a=√5)`` = U(−1/√fan_in, +1/√fan_in).

    Returns leaf tensors (requires_grad=True) shaped like the weights, on the model's device.
    """
    scores = {}
    for name, weight in maskable_parameters(model).items():
        bound = 1.0 / math.sqrt(math.prod(weight.shape[1:]))
        uniform = torch.rand(weight.shape, generator=generator, dtype=weight.dtype)
        scores[name] = ((uniform * 2 - 1) * bound).to(weight.device).requires_grad_(True)
    return scores


class _StraightThrough(torch.autograd.Function):
    """Forward: a binary mask computed from the scores; backward: the identity (∂L/∂s := ∂L/∂M)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def threshold_supermask(scores: torch.Tensor) -> torch.Tensor:
    """M = 1[s ≥ 0] with a straight-through gradient. scores: any shape → float mask of the same shape."""
    return _StraightThrough.apply(scores, (scores >= 0).to(scores.dtype))


class _MaskedWeight(torch.autograd.Function):
    """W ⊙ 1[s ≥ 0] in one pass; backward ∂L/∂s = ∂L/∂(W ⊙ M) ⊙ W (straight-through through the mask)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(weight)
        return weight * (scores >= 0)  # faster on CPU than torch.where; masked weights are ±0.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # noqa: D102
        (weight,) = ctx.saved_tensors
        return None, grad * weight


def supermask_weight(weight: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """W ⊙ 1[s ≥ 0] with the straight-through gradient, fused (same values and gradient as
    ``weight * threshold_supermask(scores)``, one kernel each way). Shapes: W and s alike → W's shape."""
    return _MaskedWeight.apply(weight, scores)


def topk_supermask(scores: torch.Tensor, keep_frac: float) -> torch.Tensor:
    """Edge-popup mask: keep the top ``keep_frac`` of |s| (the authors' ``GetSubnet`` on ``scores.abs()``).

    The ⌊(1 − keep_frac)·n⌋ smallest |s| are dropped, the rest kept. keep_frac ∈ (0, 1]. The straight-through
    gradient passes through |·| as in the authors' code: ∂L/∂s = sign(s) · ∂L/∂M.
    """
    if not 0.0 < keep_frac <= 1.0:
        raise ValueError(f"keep_frac is the fraction of weights kept and must lie in (0, 1], got {keep_frac}")
    flat = scores.detach().abs().flatten()
    dropped = int((1.0 - keep_frac) * flat.numel())
    mask = torch.ones_like(flat)
    mask[flat.argsort()[:dropped]] = 0.0
    return _StraightThrough.apply(scores.abs(), mask.view_as(scores))


def apply_masks(model: nn.Module, masks: Masks) -> Masks:
    """Effective weights W ⊙ M for every masked parameter (missing names keep W)."""
    params = maskable_parameters(model)
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise KeyError(f"masks name parameters the model does not have: {unknown}; it has {sorted(params)}")
    return {name: params[name] * mask.to(params[name].dtype) for name, mask in masks.items()}


class MaskBankError(ValueError):
    """A mask bank that does not fit a model, a task, or a file."""


FORMAT_NAME = "supsup-lite-maskbank"
FORMAT_VERSION = 1


class MaskBank:
    """The finished binary masks of every task, bit-packed (1 bit per weight) on the device.

    For parameter ``name`` with P weights the bank holds a uint8 tensor (T, ⌈P/8⌉) (see ``bits.py`` for the
    bit order). Storage grows in chunks, so appending T masks copies O(T) rows in total.
    """

    def __init__(self, shapes: dict[str, torch.Size | tuple[int, ...]], arch: str, base_seed: int,
                 num_outputs: int, device: torch.device | str = "cpu") -> None:
        if not shapes:
            raise MaskBankError("a mask bank needs at least one parameter shape")
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.arch, self.base_seed, self.num_outputs = arch, int(base_seed), int(num_outputs)
        self.device = torch.device(device)
        self._len = 0
        self.version = 0  # bumped by every append: caches of derived tensors key on it
        self._storage = {name: torch.zeros(0, packed_size(math.prod(s)), dtype=torch.uint8, device=self.device)
                         for name, s in self.shapes.items()}

    @classmethod
    def for_model(cls, model: nn.Module, arch: str, base_seed: int, num_outputs: int) -> "MaskBank":
        """An empty bank for ``model``'s maskable parameters, on the model's device."""
        params = maskable_parameters(model)
        device = next(iter(params.values())).device
        return cls({n: p.shape for n, p in params.items()}, arch, base_seed, num_outputs, device)

    # --- contents ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Masked parameter names, in model order."""
        return list(self.shapes)

    @property
    def numels(self) -> dict[str, int]:
        """Weights per masked parameter."""
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"MaskBank(arch={self.arch!r}, tasks={len(self)}, {self.nbytes:,} bytes, device={self.device})"

    @property
    def bytes_per_task(self) -> int:
        """Σ_params ⌈P/8⌉: the packed size of one task's mask."""
        return sum(packed_size(n) for n in self.numels.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored masks: T · Σ ⌈P/8⌉."""
        return len(self) * self.bytes_per_task

    def packed(self, name: str) -> torch.Tensor:
        """The packed masks of parameter ``name``: uint8 (T, ⌈P/8⌉), a view (no copy)."""
        if name not in self._storage:
            raise KeyError(f"no masked parameter {name!r}; the bank has {self.names}")
        return self._storage[name][: self._len]

    def append(self, masks: Masks) -> int:
        """Store one task's binary masks (bool or 0/1 tensors shaped like the weights); returns its index."""
        if set(masks) != set(self.shapes):
            raise MaskBankError(f"masks must cover exactly {self.names}, got {sorted(masks)}")
        rows = {}
        for name, mask in masks.items():
            if mask.shape != self.shapes[name]:
                raise MaskBankError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(self.shapes[name])}")
            if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
                raise MaskBankError(f"mask {name!r} is not binary")
            rows[name] = pack_bits(mask.detach().reshape(1, -1).to(self.device))
        for name, row in rows.items():
            storage = self._storage[name]
            if self._len == storage.shape[0]:
                grown = torch.zeros(max(8, 2 * self._len), storage.shape[1], dtype=torch.uint8, device=self.device)
                grown[: self._len] = storage[: self._len]
                self._storage[name] = storage = grown
            storage[self._len] = row[0]
        self._len += 1
        self.version += 1
        return self._len - 1

    def check_task(self, task: int) -> int:
        """Return ``task`` if the bank holds it, else raise a clear ``IndexError``."""
        if not 0 <= task < len(self):
            raise IndexError(f"task {task} is not in the bank: it holds tasks 0..{len(self) - 1}"
                             if len(self) else f"task {task} is not in the bank: the bank is empty")
        return int(task)

    def get(self, task: int, dtype: torch.dtype = torch.float32) -> Masks:
        """Task ``task``'s masks, unpacked to ``dtype`` tensors shaped like the weights."""
        task = self.check_task(task)
        return {name: unpack_bits(self._storage[name][task], numel, dtype).view(self.shapes[name])
                for name, numel in self.numels.items()}

    def check_compatible(self, model: nn.Module) -> None:
        """Raise ``MaskBankError`` unless ``model``'s maskable parameters have the bank's names and shapes."""
        model_shapes = {n: tuple(p.shape) for n, p in maskable_parameters(model).items()}
        bank_shapes = {n: tuple(s) for n, s in self.shapes.items()}
        if model_shapes != bank_shapes:
            raise MaskBankError(f"the bank was made for {self.arch!r} with parameters {bank_shapes}, "
                                f"but the model has {model_shapes}")

    # --- files ---------------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "arch": self.arch, "base_seed": self.base_seed,
                "num_outputs": self.num_outputs, "num_tasks": len(self), "names": self.names,
                "shapes": [list(self.shapes[n]) for n in self.names]}

    def save(self, path: str | Path) -> Path:
        """Write the bank to one file: metadata, the packed uint8 tensors (T rows each), CRC32s of each."""
        meta = self._metadata()
        packed = {name: self.packed(name).cpu().clone() for name in self.names}  # clone: not the spare capacity
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        crc32 = {"metadata": _metadata_checksum(meta), **{n: _tensor_checksum(t) for n, t in packed.items()}}
        torch.save({**meta, "packed": packed, "crc32": crc32}, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "MaskBank":
        """Read a bank written by :meth:`save`; any damage raises ``MaskBankError`` and returns nothing."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no mask bank at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MaskBankError(f"{path} is not a readable mask bank (truncated or corrupted?): {err}") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise MaskBankError(f"{path} is not a supsup-lite mask bank")
        if state.get("version") != FORMAT_VERSION:
            raise MaskBankError(f"{path} has format version {state.get('version')}, this code reads {FORMAT_VERSION}")
        try:
            meta = {key: state[key] for key in _METADATA_KEYS}
            packed = {name: state["packed"][name] for name in meta["names"]}
            stored_crc = dict(state["crc32"])
            metadata_intact = _metadata_checksum(meta) == stored_crc.pop("metadata")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise MaskBankError(f"{path}: the file lacks or garbles part of the bank ({err!r})") from err
        if not metadata_intact:
            raise MaskBankError(f"{path}: checksum mismatch in the metadata; the file is corrupted")
        bank = cls(dict(zip(meta["names"], meta["shapes"])), meta["arch"], meta["base_seed"], meta["num_outputs"],
                   device)
        for name, tensor in packed.items():
            expected = (meta["num_tasks"], packed_size(math.prod(bank.shapes[name])))
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
                raise MaskBankError(f"{path}: parameter {name!r} holds {getattr(tensor, 'shape', tensor)} "
                                    f"{getattr(tensor, 'dtype', '')}, expected {expected} uint8")
            if _tensor_checksum(tensor) != stored_crc.get(name):
                raise MaskBankError(f"{path}: checksum mismatch for {name!r}; the file is corrupted")
        bank._storage = {name: tensor.to(bank.device) for name, tensor in packed.items()}
        bank._len = meta["num_tasks"]
        return bank


_METADATA_KEYS = ("format", "version", "arch", "base_seed", "num_outputs", "num_tasks", "names", "shapes")


def _metadata_checksum(meta: dict) -> int:
    """CRC32 of the metadata as canonical JSON."""
    return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


def _tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a CPU tensor's bytes."""
    return zlib.crc32(tensor.contiguous().numpy().tobytes())
