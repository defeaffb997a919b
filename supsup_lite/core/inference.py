"""Task inference from the gradient of an output objective with respect to the mixing coefficients α.

With p(α) = f(x, W ⊙ Σ_t α_t M_t) (Eq. 2), the task is the mask whose weight, when increased, lowers the
objective most: one-shot takes argmin_t ∂H/∂α_t at α = 1/T (Eq. 4); binary search halves the candidates at
the median gradient ⌈log₂ T⌉ times.

For many images at once (:func:`alpha_gradient_each`) the gradients are exact too, without one backward per
image: for a fully connected layer with input a and output gradient δ, ∂H/∂α_t = Σ_layers δᵀ (W ⊙ M_t) a.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import validation
from .masks import MaskBank
from .models import maskable_parameters, masked_forward
from .superpose import check_alphas, masks_dot, superposed_weights, unpack_float

Objective = Callable[[torch.Tensor], torch.Tensor]

FLOATS_PER_BLOCK = 1 << 22  # working set of the batched gradients: 4 M floats (16 MB) per block
IMAGES_PER_PASS = 4096      # images forwarded at once by alpha_gradient_each


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Output entropy H = −Σ_j p_j log p_j with p = softmax(logits). logits: (B, s) → (B,)."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(1)


def superfluous_logsumexp(logits: torch.Tensor, *, real_neurons: int = 10) -> torch.Tensor:
    """Objective G = logsumexp(z) over all s outputs, with the gradient of the ℓ real-class logits blocked.

    logits: (B, s) → (B,). ∂G/∂z_j = softmax_j(z) for the superfluous j ≥ ℓ, and 0 for j < ℓ.
    """
    if not 0 < real_neurons < logits.shape[1]:
        raise ValueError(f"G needs superfluous outputs: real_neurons={real_neurons} must lie in "
                         f"[1, {logits.shape[1] - 1}] for {logits.shape[1]} outputs")
    z = torch.cat([logits[:, :real_neurons].detach(), logits[:, real_neurons:]], dim=1)
    return torch.logsumexp(z, dim=1)


def uniform_alphas(bank: MaskBank, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """α = 1/k on the k candidate tasks (all tasks by default), 0 elsewhere: (T,) float on the bank's device."""
    alphas = torch.zeros(len(bank), device=bank.device)
    if candidates is None:
        alphas.fill_(1.0 / len(bank))
    else:
        alphas[candidates] = 1.0 / candidates.numel()
    return alphas


def check_inputs(model: nn.Module, bank: MaskBank, x: object) -> torch.Tensor:
    """The checks at the entry of every inference function: the bank belongs to ``model`` (same random network,
    same device; ``MaskBank.check_compatible``) and holds a task, and ``x`` is a non-empty batch of finite images
    the model takes (``validation.images``: one image is ``x[:1]``). Returns ``x``."""
    bank.check_compatible(model)
    _check_not_empty(bank)
    return validation.images(model, x)


def _check_not_empty(bank: MaskBank) -> None:
    if len(bank) == 0:
        raise ValueError("the bank is empty: train at least one task first (training.train_bank)")


def check_group_size(group_size: object, images: int) -> int:
    """``group_size`` as an int ≥ 1 that divides the number of ``images``, else a clear error."""
    group_size = validation.integer("group_size", group_size, minimum=1)
    if images % group_size:
        raise ValueError(f"group_size must divide the {images} images, got {group_size}")
    return group_size


def alpha_gradient(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, alphas: torch.Tensor | None = None,
                   objective: Objective = entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Objective and its gradient in α: (mean_b objective(f(x_b, W ⊙ Σ α_t M_t)), ∂/∂α (T,)).

    x: (B, ...) one image (B = 1) or a batch; alphas: (T,), default 1/T. Both results on the bank's device.
    """
    check_inputs(model, bank, x)
    alphas = uniform_alphas(bank) if alphas is None else alphas
    return gradient_on_rows(model, bank, x, alphas, rows=None, objective=objective)


def gradient_on_rows(model: nn.Module, bank: MaskBank, x: torch.Tensor, alphas: torch.Tensor, *,
                     rows: torch.Tensor | None, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`alpha_gradient` for the tasks ``rows`` only (k,) (default all): (mean objective, ∂/∂α_rows (k,)).

    One backward to the effective weights, then ∂/∂α_t = Σ_layers ⟨∂L/∂W_eff ⊙ W, M_t⟩ over the packed masks
    of the requested tasks only (binary search asks for its candidates, not all T). Inputs checked by the caller
    (:func:`check_inputs`).
    """
    check_alphas(bank, alphas)
    params = maskable_parameters(model)
    with torch.no_grad():
        weights = {name: w.requires_grad_(True) for name, w in superposed_weights(model, bank, alphas).items()}
    with torch.enable_grad():
        value = objective(masked_forward(model, weights, x)).mean()
        grads = torch.autograd.grad(value, list(weights.values()))
    grad = sum(masks_dot(bank.packed(name), numel, (g * params[name]).flatten(), rows)
               for (name, numel), g in zip(bank.numels.items(), grads))
    return value.detach(), grad


def first_tasks(bank: MaskBank, num_tasks: int | None) -> torch.Tensor:
    """Task indices 0..k−1 of the first ``num_tasks`` learned tasks (all by default): (k,) int64."""
    _check_not_empty(bank)
    k = len(bank) if num_tasks is None else validation.integer("num_tasks", num_tasks, minimum=1, maximum=len(bank))
    return torch.arange(k, device=bank.device)


def one_shot(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, objective: Objective = entropy,
             num_tasks: int | None = None) -> int:
    """One-Shot inference: argmin_t ∂objective/∂α_t at α = 1/T, over the learned tasks only (Eq. 4).

    ``num_tasks``: superpose and search only the first k tasks of the bank (default all).
    """
    check_inputs(model, bank, x)
    candidates = first_tasks(bank, num_tasks)
    _, grad = gradient_on_rows(model, bank, x, uniform_alphas(bank, candidates), rows=candidates,
                               objective=objective)
    return int(grad.argmin())


def binary_search_step(grad: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Keep the ⌈k/2⌉ candidates with the smallest gradient (ties broken by task index).

    grad: (T,), candidates: (k,) int64 → (⌈k/2⌉,) int64. Equals the authors' "grad ≤ median" rule when the
    gradients are distinct, and always makes progress (their rule loops forever on ties).
    """
    order = torch.sort(grad[candidates], stable=True).indices
    return candidates[order[: (candidates.numel() + 1) // 2]].sort().values


def binary_search(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, objective: Objective = entropy,
                  num_tasks: int | None = None) -> int:
    """Binary inference: halve the candidate tasks at the median α-gradient until one is left (⌈log₂ T⌉ steps).

    Each step keeps ⌈k/2⌉ candidates, so it ends after exactly ⌈log₂ T⌉ steps, ties or not, for one image too.
    ``num_tasks``: search only the first k tasks of the bank (default all). Each step reads the masks of its
    candidates only.
    """
    check_inputs(model, bank, x)
    candidates = first_tasks(bank, num_tasks)
    grad = torch.zeros(len(bank), device=bank.device)
    while candidates.numel() > 1:
        _, grad[candidates] = gradient_on_rows(model, bank, x, uniform_alphas(bank, candidates), rows=candidates,
                                               objective=objective)
        candidates = binary_search_step(grad, candidates)
    return int(candidates[0])


# --- many images at once -------------------------------------------------------------------------------------
def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` module of every maskable parameter; other maskable layers or batch norms are an error."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise TypeError("batched per-image gradients need images that do not interact; this model has batch norm")
    layers = {}
    for name in maskable_parameters(model):
        module = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"batched per-image gradients need fully connected models; {name!r} belongs to a "
                            f"{type(module).__name__} (use alpha_gradient image by image)")
        layers[name] = module
    return layers


def is_fully_connected(model: nn.Module) -> bool:
    """True when :func:`alpha_gradient_each` applies: every maskable layer is ``nn.Linear``, no batch norm."""
    try:
        linear_layers(model)
    except TypeError:
        return False
    return True


def layer_signals(model: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, objective: Objective,
                  layers: dict[str, nn.Linear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input a (B, in) and output gradient δ = ∂(Σ_b objective_b)/∂z (B, out) of every layer, one backward."""
    inputs, outputs = {}, {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so the first layer's output joins the graph
            value = objective(masked_forward(model, weights, x)).sum()
            deltas = torch.autograd.grad(value, list(outputs.values()))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (inputs[name].flatten(0, -2), delta.flatten(0, -2)) for name, delta in zip(outputs, deltas)}


def task_blocks(num_tasks: int, numel: int) -> list[tuple[int, int]]:
    """Ranges of tasks whose unpacked float masks (block · numel numbers) fit in ``FLOATS_PER_BLOCK``."""
    step = max(1, FLOATS_PER_BLOCK // numel)
    return [(t, min(t + step, num_tasks)) for t in range(0, num_tasks, step)]


def alpha_gradient_each(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, objective: Objective = entropy,
                        num_tasks: int | None = None, group_size: int = 1,
                        candidates: torch.Tensor | None = None) -> torch.Tensor:
    """∂objective/∂α at α uniform on the candidates, for every group of ``group_size`` consecutive images on its own.

    x: (N, ...) → (N/g, k): column j is ∂/∂α of task ``candidates[j]`` (default: the first ``num_tasks`` tasks,
    all by default). Row i equals ``alpha_gradient(model, bank, x[g·i : g·(i+1)], alphas=α)[1][candidates]``
    (the group's mean objective), exactly, without one backward per group: with every layer's input a_b and
    output gradient δ_b from one backward of Σ_b objective_b,

        ∂objective_b/∂α_t = Σ_layers δ_bᵀ (W ⊙ M_t) a_b        (group_size = 1: per image, batched matmuls)
        ∂mean_g/∂α_t     = Σ_layers ⟨(1/g) Σ_b δ_b a_bᵀ ⊙ W, M_t⟩   (groups: one matrix product with the masks)

    Masks are unpacked a block of tasks at a time (``FLOATS_PER_BLOCK``). Fully connected models only.
    """
    check_inputs(model, bank, x)
    group_size = check_group_size(group_size, x.shape[0])
    candidates = first_tasks(bank, num_tasks) if candidates is None else candidates.to(bank.device)
    layers = linear_layers(model)
    params = maskable_parameters(model)
    with torch.no_grad():
        weights = superposed_weights(model, bank, uniform_alphas(bank, candidates))
    largest = max(bank.numels.values())
    groups_per_pass = (max(1, IMAGES_PER_PASS // group_size) if group_size == 1
                       else max(1, min(IMAGES_PER_PASS // group_size, FLOATS_PER_BLOCK // largest)))
    images_per_pass = groups_per_pass * group_size
    grads = torch.zeros(x.shape[0] // group_size, candidates.numel(), device=x.device)
    for start in range(0, x.shape[0], images_per_pass):
        rows = grads[start // group_size:(start + images_per_pass) // group_size]
        signals = layer_signals(model, weights, x[start:start + images_per_pass], objective, layers)
        for name, (a, delta) in signals.items():
            if group_size == 1:
                _add_per_image(rows, a, delta, params[name], bank.packed(name), candidates)
            else:
                _add_per_group(rows, a, delta, params[name], bank.packed(name), candidates, group_size)
    return grads


def _add_per_image(out: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                   packed: torch.Tensor, tasks: torch.Tensor) -> None:
    """out[b, j] += δ_bᵀ (W ⊙ M_t) a_b for t = tasks[j]. a: (B, in), δ: (B, o), W: (o, in), packed: (T, ⌈P/8⌉)."""
    outs, ins = weight.shape
    for t0, t1 in task_blocks(tasks.numel(), weight.numel()):
        masks = unpack_float(packed.index_select(0, tasks[t0:t1]), weight.numel(), weight.dtype)
        masked = weight * masks.view(-1, outs, ins)
        step = max(1, FLOATS_PER_BLOCK // ((t1 - t0) * outs))
        for i in range(0, a.shape[0], step):
            projected = (a[i:i + step] @ masked.view(-1, ins).T).view(-1, t1 - t0, outs)  # (b, Tc, o)
            out[i:i + step, t0:t1] += torch.bmm(projected, delta[i:i + step, :, None]).squeeze(2)


def _add_per_group(out: torch.Tensor, a: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                   packed: torch.Tensor, tasks: torch.Tensor, group_size: int) -> None:
    """out[i, j] += ⟨(1/g) Σ_{b ∈ group i} δ_b a_bᵀ ⊙ W, M_t⟩ (t = tasks[j]) for groups of g consecutive rows."""
    outs, ins = weight.shape
    groups = a.shape[0] // group_size
    outer = delta.view(groups, group_size, outs).transpose(1, 2) @ a.view(groups, group_size, ins)
    weighted = (outer * (weight / group_size)).view(groups, -1)  # (G, P)
    for t0, t1 in task_blocks(tasks.numel(), weight.numel()):
        out[:, t0:t1] += weighted @ unpack_float(packed.index_select(0, tasks[t0:t1]), weight.numel(), weight.dtype).T


def one_shot_each(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, objective: Objective = entropy,
                  num_tasks: int | None = None, group_size: int = 1) -> torch.Tensor:
    """One-Shot inference for every group of ``group_size`` images on its own: (N, ...) → tasks (N/g,) int64.

    Row i equals ``one_shot(model, bank, x[g·i : g·(i+1)], objective=objective, num_tasks=num_tasks)``.
    """
    return alpha_gradient_each(model, bank, x, objective=objective, num_tasks=num_tasks,
                               group_size=group_size).argmin(1)


def binary_search_each(model: nn.Module, bank: MaskBank, x: torch.Tensor, *, objective: Objective = entropy,
                       num_tasks: int | None = None, group_size: int = 1) -> torch.Tensor:
    """Binary search for every group of ``group_size`` images on its own: (N, ...) → tasks (N/g,) int64.

    Row i equals ``binary_search(model, bank, x[g·i : g·(i+1)], objective=objective, num_tasks=num_tasks)``.
    Every step keeps ⌈k/2⌉ candidates per group; groups that share a candidate set share one batched gradient call.
    """
    check_inputs(model, bank, x)
    group_size = check_group_size(group_size, x.shape[0])
    groups = x.shape[0] // group_size
    images = x.view(groups, group_size, *x.shape[1:])
    alive = first_tasks(bank, num_tasks).expand(groups, -1)  # (G, k): every group's candidates, ascending
    while alive.shape[1] > 1:
        kept = torch.empty(groups, (alive.shape[1] + 1) // 2, dtype=torch.long, device=alive.device)
        sets, which = torch.unique(alive, dim=0, return_inverse=True)
        for s, candidates in enumerate(sets):
            members = torch.nonzero(which == s).squeeze(1)
            grads = alpha_gradient_each(model, bank, images[members.to(x.device)].flatten(0, 1),
                                        objective=objective, group_size=group_size, candidates=candidates)
            order = torch.sort(grads.to(alive.device), dim=1, stable=True).indices[:, :kept.shape[1]]
            kept[members] = candidates[order].sort(dim=1).values  # as binary_search_step, per group
        alive = kept
    return alive[:, 0]
