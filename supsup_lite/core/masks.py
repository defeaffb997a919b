"""Supermasks: score initialisation, straight-through mask functions, and the bit-packed ``MaskBank``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from .. import validation
from ..config import resolve_device
from .bits import pack_bits, packed_size, unpack_bits
from .files import check_tensor, read_state, save_tensors, tensor_checksum
from .models import maskable_parameters

if TYPE_CHECKING:
    from ..data.mnist import TaskStream

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


def topk_keep(magnitude: torch.Tensor, keep_frac: float) -> torch.Tensor:
    """Float {0, 1} mask keeping all but the d = ⌊(1 − keep_frac)·n⌋ smallest entries of ``magnitude`` (no grad).

    The d-th smallest value v comes from one selection (``torch.kthvalue``, about 5× faster than a full sort):
    entries below v are dropped, then entries equal to v in index order until exactly d are dropped.
    """
    if not 0.0 < keep_frac <= 1.0:
        raise ValueError(f"keep_frac is the fraction of weights kept and must lie in (0, 1], got {keep_frac}")
    flat = magnitude.detach().flatten()
    dropped = int((1.0 - keep_frac) * flat.numel())
    mask = torch.ones_like(flat)
    if dropped == 0:
        return mask.view_as(magnitude)
    value = torch.kthvalue(flat, dropped).values
    below = flat < value
    mask[below] = 0.0
    ties = torch.nonzero(flat == value).squeeze(1)
    mask[ties[: dropped - int(below.sum())]] = 0.0
    return mask.view_as(magnitude)


def topk_supermask(scores: torch.Tensor, keep_frac: float) -> torch.Tensor:
    """Edge-popup mask: keep the top ``keep_frac`` of |s| (the authors' ``GetSubnet`` on ``scores.abs()``).

    The ⌊(1 − keep_frac)·n⌋ smallest |s| are dropped, the rest kept. keep_frac ∈ (0, 1]. |s| is taken once;
    the straight-through gradient passes through it as in the authors' code: ∂L/∂s = sign(s) · ∂L/∂M.
    scores: any shape → float mask of the same shape.
    """
    magnitude = scores.abs()
    return _StraightThrough.apply(magnitude, topk_keep(magnitude, keep_frac))


def final_masks(scores: Masks, *, keep_frac: float | Mapping[str, float] | None = None) -> Masks:
    """The binary masks a training run keeps (the one place they are made): name → bool tensor shaped like s.

    M = 1[s ≥ 0] (``keep_frac=None``) or the top ``keep_frac`` of |s| over each tensor (as ``topk_supermask``);
    ``keep_frac`` may map each name to its own fraction (per-layer densities). NaN scores (a diverged run) have
    no sign and no rank, so both rules refuse them with a ``ValueError`` rather than drop or keep those weights.
    """
    with torch.no_grad():
        for name, s in scores.items():
            nan = int(torch.isnan(s).sum())
            if nan:
                raise ValueError(f"scores[{name!r}] holds {nan} NaN of {s.numel()} values: training diverged, and "
                                 f"a NaN score is neither kept nor dropped by a mask rule; lower lr or check the "
                                 f"inputs for NaN")
        if keep_frac is None:
            return {name: s.detach() >= 0 for name, s in scores.items()}
        fracs = keep_frac if isinstance(keep_frac, Mapping) else dict.fromkeys(scores, keep_frac)
        return {name: topk_keep(s.abs(), fracs[name]) > 0 for name, s in scores.items()}


def apply_masks(model: nn.Module, masks: Masks) -> Masks:
    """Effective weights W ⊙ M for every masked parameter (missing names keep W)."""
    params = maskable_parameters(model)
    validation.masks_fit(params, masks)
    return {name: params[name] * mask.to(params[name].dtype) for name, mask in masks.items()}


class MaskBankError(ValueError):
    """A mask bank that does not fit a model, a task stream, a task, or a file."""


FORMAT_NAME = "supsup-lite-maskbank"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class NetworkFingerprint:
    """What identifies a frozen base network: architecture, seed, maskable shapes, and its sign pattern.

    ``signs_crc32`` is the CRC32 of the packed bits 1[W > 0] of every maskable weight in model order, so two
    networks with the same shapes but other random signs (another seed) differ. ``seed`` is informative (None
    when the model does not record one); equality compares every field.
    """

    arch: str
    seed: int | None
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    signs_crc32: int

    @classmethod
    def of(cls, model: nn.Module) -> "NetworkFingerprint":
        """The fingerprint of ``model`` (cached on the model until one of its weights changes)."""
        params = maskable_parameters(model)
        if not params:
            raise MaskBankError(f"{type(model).__name__} has no maskable (Linear/Conv2d) weights")
        key = tuple((p.data_ptr(), p._version) for p in params.values())
        cached = getattr(model, "_supsup_fingerprint", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        signs = torch.cat([pack_bits(p.detach().reshape(-1) > 0) for p in params.values()])
        fingerprint = cls(arch=str(getattr(model, "arch", type(model).__name__)),
                          seed=getattr(model, "base_seed", None),
                          shapes=tuple((name, tuple(p.shape)) for name, p in params.items()),
                          signs_crc32=tensor_checksum(signs.cpu()))
        object.__setattr__(model, "_supsup_fingerprint", (key, fingerprint))  # not a submodule or buffer
        return fingerprint

    @property
    def num_outputs(self) -> int:
        """Outputs of the last maskable layer (the head)."""
        return self.shapes[-1][1][0]

    def to_dict(self) -> dict:
        """JSON-ready form (shapes as lists)."""
        return {"arch": self.arch, "seed": self.seed, "shapes": [[n, list(s)] for n, s in self.shapes],
                "signs_crc32": self.signs_crc32}

    @classmethod
    def from_dict(cls, state: dict) -> "NetworkFingerprint":
        """Inverse of :meth:`to_dict`."""
        return cls(arch=str(state["arch"]), seed=None if state["seed"] is None else int(state["seed"]),
                   shapes=tuple((str(n), tuple(int(d) for d in s)) for n, s in state["shapes"]),
                   signs_crc32=int(state["signs_crc32"]))

    def describe(self) -> str:
        """One line for error messages."""
        layers = ", ".join(f"{n} {tuple(s)}" for n, s in self.shapes)
        return f"{self.arch} (seed {self.seed}, signs crc32 {self.signs_crc32:08x}; {layers})"


class MaskBank:
    """The finished binary masks of every task of one base network, bit-packed (1 bit per weight) on a device.

    For parameter ``name`` with P weights the bank holds a uint8 tensor (T, ⌈P/8⌉) (see ``bits.py`` for the
    bit order). Storage grows in chunks, so appending T masks copies O(T) rows in total. The bank records the
    :class:`NetworkFingerprint` of its base network (checked whenever it meets a model: masks only make sense on
    the random network they were trained on) and, when known, the fingerprint of the task stream it was trained
    on (``TaskStream.fingerprint()``: stream kind, seed, task parameters). ``version`` grows with every change.
    """

    def __init__(self, network: NetworkFingerprint, *, stream: dict | None = None,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(network, NetworkFingerprint):
            raise TypeError(f"network must be a NetworkFingerprint (NetworkFingerprint.of(model)), "
                            f"got {type(network).__name__}; MaskBank.for_model(model) builds one for a model")
        self.network, self.stream = network, None if stream is None else dict(stream)
        self.device = resolve_device(device)
        self._len = 0
        self.version = 0  # bumped by every append and replace: caches of derived tensors key on it
        self._storage = {name: torch.zeros(0, packed_size(math.prod(s)), dtype=torch.uint8, device=self.device)
                         for name, s in network.shapes}

    @classmethod
    def for_model(cls, model: nn.Module, *, stream: "TaskStream | None" = None) -> "MaskBank":
        """An empty bank for ``model``'s maskable parameters, on the model's device; ``stream`` (optional) is the
        task stream its masks will be trained on."""
        device = next(iter(maskable_parameters(model).values())).device
        return cls(NetworkFingerprint.of(model), stream=None if stream is None else stream.fingerprint(),
                   device=device)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Masked parameter shapes by name, in model order."""
        return {name: torch.Size(shape) for name, shape in self.network.shapes}

    @property
    def arch(self) -> str:
        """The base network's architecture name."""
        return self.network.arch

    @property
    def base_seed(self) -> int | None:
        """The base network's seed (None when the model recorded none)."""
        return self.network.seed

    @property
    def num_outputs(self) -> int:
        """Output size s of the base network."""
        return self.network.num_outputs

    def clone(self) -> "MaskBank":
        """An independent copy (same device): later changes to either leave the other as it is."""
        bank = MaskBank(self.network, stream=self.stream, device=self.device)
        bank._storage = {name: self.packed(name).clone() for name in self.names}
        bank._len, bank.version = self._len, self.version
        return bank

    def to(self, device: torch.device | str) -> "MaskBank":
        """This bank on ``device``: itself when already there, else a copy (like ``Tensor.to``)."""
        device = resolve_device(device)
        if device == self.device:
            return self
        bank = self.clone()
        bank._storage = {name: packed.to(device) for name, packed in bank._storage.items()}
        bank.device = device
        return bank

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

    def _packed_rows(self, masks: Masks) -> dict[str, torch.Tensor]:
        """One task's masks checked (names, shapes, binary) and packed: name → (1, ⌈P/8⌉) uint8 on the device."""
        if set(masks) != set(self.shapes):
            raise MaskBankError(f"masks must cover exactly {self.names}, got {sorted(masks)}")
        rows = {}
        for name, mask in masks.items():
            if mask.shape != self.shapes[name]:
                raise MaskBankError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(self.shapes[name])}")
            if mask.dtype != torch.bool and not torch.all((mask == 0) | (mask == 1)):
                raise MaskBankError(f"mask {name!r} is not binary")
            rows[name] = pack_bits(mask.detach().reshape(1, -1).to(self.device))
        return rows

    def append(self, masks: Masks) -> int:
        """Store one task's binary masks (bool or 0/1 tensors shaped like the weights); returns its index."""
        rows = self._packed_rows(masks)
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

    def replace(self, task: int, masks: Masks) -> None:
        """Overwrite stored task ``task``'s masks (e.g. a mask that kept training in Scenario NNs)."""
        task = self.check_task(task)
        rows = self._packed_rows(masks)
        for name, row in rows.items():
            self._storage[name][task] = row[0]
        self.version += 1

    def check_task(self, task: int) -> int:
        """Return ``task`` if the bank holds it, else raise a clear ``TypeError`` / ``IndexError``."""
        task = validation.integer("task", task)
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
        """Raise ``MaskBankError`` unless ``model`` is the base network the bank's masks were trained on, on the
        bank's device."""
        network = NetworkFingerprint.of(model)
        if network != self.network:
            raise MaskBankError(f"this bank's masks were trained on {self.network.describe()}, but the model is "
                                f"{network.describe()}; masks only work on their own random network: rebuild "
                                f"the model with the bank's architecture and seed, or train a new bank")
        model_device = next(iter(maskable_parameters(model).values())).device
        if model_device != self.device:
            raise MaskBankError(f"the bank is on {self.device} but the model on {model_device}: move the bank with "
                                f"bank = bank.to({str(model_device)!r})")

    def check_stream(self, stream: "TaskStream") -> None:
        """Raise ``MaskBankError`` unless ``stream`` defines the tasks the bank was trained on (when recorded)."""
        if self.stream is not None and stream.fingerprint() != self.stream:
            raise MaskBankError(f"this bank was trained on the task stream {self.stream}, but got "
                                f"{stream.fingerprint()}; its masks fit only their own tasks: build the stream "
                                f"with the same settings, or train a new bank")

    # --- files ---------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bank to one file, atomically: metadata, the packed uint8 tensors (T rows each), CRC32s of
        each (``files.save_tensors``). ``path`` must not be a folder; its folder is created when missing."""
        path = validation.output_file("path", path)
        packed = {name: self.packed(name).cpu().clone() for name in self.names}  # clone: not the spare capacity
        metadata = {"network": self.network.to_dict(), "stream": self.stream, "num_tasks": len(self)}
        return save_tensors(path, kind=FORMAT_NAME, version=FORMAT_VERSION, metadata=metadata, tensors=packed,
                            tensor_key="packed")

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str | None = None) -> "MaskBank":
        """Read a bank written by :meth:`save` onto ``device`` (default ``config.device()``); any damage raises
        ``MaskBankError`` and returns nothing."""
        device = resolve_device(device)
        meta, packed, stored_crc = read_state(path, kind=FORMAT_NAME, version=FORMAT_VERSION, what="mask bank",
                                              error=MaskBankError, tensor_key="packed",
                                              upgrade="version 1 banks record no base-network fingerprint: "
                                                      "retrain them")
        try:
            network = NetworkFingerprint.from_dict(meta["network"])
            packed = {name: packed[name] for name, _ in network.shapes}
            num_tasks = int(meta["num_tasks"])
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            raise MaskBankError(f"{path}: the file lacks or garbles part of the bank ({err!r})") from err
        bank = cls(network, stream=meta["stream"], device=device)
        for name, tensor in packed.items():
            expected = (num_tasks, packed_size(math.prod(bank.shapes[name])))
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
                raise MaskBankError(f"{path}: parameter {name!r} holds {getattr(tensor, 'shape', tensor)} "
                                    f"{getattr(tensor, 'dtype', '')}, expected {expected} uint8")
            check_tensor(path, name, tensor, stored_crc, error=MaskBankError)
        bank._storage = {name: tensor.to(bank.device) for name, tensor in packed.items()}
        bank._len = bank.version = num_tasks
        return bank
