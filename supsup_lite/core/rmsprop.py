"""One RMSprop step on supermask scores with the threshold mask refreshed, bit for bit ``torch.optim.RMSprop``.

On flat buffers of equal length N (all layers and tasks of a training step side by side), in place:

    g ← ∂L/∂E ⊙ W                       (the straight-through gradient of the scores)
    v ← α·v + (1 − α)·g²                 (torch: ``v.mul_(α).addcmul_(g, g, value=1 − α)``, one fused multiply-add)
    s ← s − lr·g / (√v + ε)             (torch: ``s.addcdiv_(g, √v + ε, value=−lr)``, i.e. s + ((−lr)·g) / d)
    E ← W ⊙ 1[s ≥ 0]                     (the masked weights of the next forward pass)

Plain torch runs this as eight passes over N floats. On CPU in float32 it is three passes here: a numba pass for g
and v (with LLVM's fused multiply-add, as torch's vectorised ``addcmul`` rounds it), torch's own ``sqrt`` (kept:
torch's vectorised float32 square root is not the correctly rounded IEEE one — it differs from it in about 0.6 %
of random inputs — so any other square root would change the scores' last bits), and a numba pass for s and E.
Every rounding step is the one torch performs, so scores, masks and therefore whole training runs are identical
(``tests/test_training.py`` checks the buffers bit for bit against the torch operations). Other dtypes and CUDA
use the torch operations.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic
except ImportError:  # pragma: no cover (numba is a dependency in pyproject.toml)
    numba = None

RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch.optim.RMSprop's defaults, as the authors use them


def rmsprop_step_torch(s: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, e: torch.Tensor,
                       scratch: torch.Tensor, *, lr: float) -> None:
    """The step in plain torch operations (the definition; CUDA and non-float32 path). All (N,), in place;
    ``scratch``: (N,) work space."""
    g.mul_(w)
    v.mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
    torch.sqrt(v, out=scratch).add_(RMSPROP_EPS)
    s.addcdiv_(g, scratch, value=-lr)
    torch.ge(s, 0, out=scratch)
    torch.mul(w, scratch, out=e)


@lru_cache(maxsize=None)
def _cpu_kernels() -> tuple:
    """The two numba passes (compiled on first use, cached on disk)."""
    if numba is None:
        raise ImportError("the fused score update on CPU needs numba (a dependency of supsup-lite): pip install numba")

    @intrinsic
    def fma32(typingctx, x, y, z):  # noqa: ARG001 (numba's intrinsic signature)
        """llvm.fma.f32: x·y + z rounded once, as torch's vectorised addcmul computes it."""
        def codegen(context, builder, signature, args):  # noqa: ARG001
            f32 = ir.FloatType()
            fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
            return builder.call(fn, args)
        return types.float32(types.float32, types.float32, types.float32), codegen

    jit = numba.njit(cache=True, boundscheck=False, nogil=True)

    @jit
    def gradient_and_average(v: np.ndarray, g: np.ndarray, w: np.ndarray) -> None:  # pragma: no cover (numba)
        alpha, rest = np.float32(RMSPROP_ALPHA), np.float32(1 - RMSPROP_ALPHA)
        for i in range(v.shape[0]):
            gi = g[i] * w[i]
            g[i] = gi
            v[i] = fma32(rest * gi, gi, v[i] * alpha)

    @jit
    def scores_and_weights(s: np.ndarray, g: np.ndarray, root: np.ndarray, w: np.ndarray, e: np.ndarray,
                           neg_lr: np.float32) -> None:  # pragma: no cover (numba)
        eps = np.float32(RMSPROP_EPS)
        for i in range(s.shape[0]):
            si = s[i] + (neg_lr * g[i]) / (root[i] + eps)
            s[i] = si
            e[i] = w[i] * (np.float32(1.0) if si >= 0 else np.float32(0.0))

    return gradient_and_average, scores_and_weights


def rmsprop_step_(s: torch.Tensor, v: torch.Tensor, g: torch.Tensor, w: torch.Tensor, e: torch.Tensor,
                  scratch: torch.Tensor, *, lr: float) -> None:
    """One step (module docstring) on contiguous (N,) buffers, in place: s scores, v square averages, g ∂L/∂E on
    entry (g ⊙ W on exit), w the frozen weights, e receives W ⊙ 1[s ≥ 0]; ``scratch`` (N,) work space."""
    if s.device.type != "cpu" or s.dtype != torch.float32:
        rmsprop_step_torch(s, v, g, w, e, scratch, lr=lr)
        return
    gradient_and_average, scores_and_weights = _cpu_kernels()
    gradient_and_average(v.numpy(), g.numpy(), w.numpy())
    torch.sqrt(v, out=scratch)
    scores_and_weights(s.numpy(), g.numpy(), scratch.numpy(), w.numpy(), e.numpy(), np.float32(-lr))
