"""An interactive α explorer: slide the mixing coefficients of the superposed masks and watch the output
distribution, its entropy H and the gradient ∂H/∂α; step One-Shot or binary search by hand.

The numbers come from pure functions (:func:`alpha_readout`, :func:`one_shot_step`, :func:`binary_step`); the
:class:`AlphaExplorer` is a thin ipywidgets layer over them, so it can be driven and tested without a browser
(set a slider's ``.value`` or call a button's ``.click()``: observers run synchronously in the kernel).
"""
from __future__ import annotations

import base64
import html
import io
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import ipywidgets as widgets
import torch
from torch import nn

from ..core.inference import alpha_gradient, binary_search_step
from ..core.masks import MaskBank
from ..core.models import masked_forward
from ..core.superpose import superposed_weights
from ..data.mnist import TaskStream

MAX_TASKS = 10
TIE_TOLERANCE = 1e-5  # gradients closer than this fraction of the largest are equal (float32 sums differ by ulps)


@dataclass
class AlphaReadout:
    """What the explorer shows for one image: effective α (T,), output distribution p (s,), H = −Σ p log p,
    and ∂H/∂α (T,)."""

    alphas: torch.Tensor
    probs: torch.Tensor
    entropy: float
    grad: torch.Tensor

    @property
    def steepest(self) -> int | None:
        """The task One-Shot would pick from here: argmin_t ∂H/∂α_t; None when no task is steeper than the others
        (every gradient equal up to float rounding, ``TIE_TOLERANCE`` of the largest |∂H/∂α|, e.g. all 0) or a
        gradient is not finite."""
        if not bool(torch.isfinite(self.grad).all()):
            return None
        spread, scale = self.grad.max() - self.grad.min(), self.grad.abs().max()
        if self.grad.numel() > 1 and bool(spread <= TIE_TOLERANCE * scale):
            return None
        return int(self.grad.argmin())

    @property
    def problem(self) -> str | None:
        """Why this readout names no steepest task (None when it does)."""
        if self.steepest is not None:
            return None
        if not bool(torch.isfinite(self.grad).all()):
            return "∂H/∂α is not finite here: no task is steeper; press “uniform α” or move a slider"
        return ("every ∂H/∂α is equal, so no task is steeper (One-Shot would only pick the first); move a slider "
                "or press “uniform α”")


def effective_alphas(raw: Sequence[float], normalise: bool) -> torch.Tensor:
    """α from the slider values: as set, or divided by their sum (Σα = 1) when ``normalise`` and the sum is > 0.
    Raises ``ValueError`` for a negative or non-finite (NaN, inf) value."""
    alphas = torch.tensor([float(v) for v in raw])
    if not bool(torch.isfinite(alphas).all()):
        bad = [f"α{t}" for t in torch.nonzero(~torch.isfinite(alphas)).flatten().tolist()]
        values = alphas[~torch.isfinite(alphas)].tolist()
        raise ValueError(f"α must be finite numbers, but {', '.join(bad)} = {values}: "
                         f"set {'it' if len(bad) == 1 else 'them'} to a number in [0, 1]")
    if (alphas < 0).any():
        raise ValueError(f"α must be ≥ 0, got {alphas.tolist()}")
    total = alphas.sum()
    return alphas / total if normalise and total > 0 else alphas


def alpha_readout(model: nn.Module, bank: MaskBank, x: torch.Tensor, alphas: torch.Tensor) -> AlphaReadout:
    """Output distribution, entropy and ∂H/∂α of one image x (1, ...) under W ⊙ Σ_t α_t M_t."""
    if x.shape[0] != 1:
        raise ValueError(f"the explorer looks at one image at a time: x must be (1, ...), got {tuple(x.shape)}")
    alphas = alphas.to(bank.device)
    value, grad = alpha_gradient(model, bank, x, alphas=alphas)
    with torch.no_grad():
        probs = torch.softmax(masked_forward(model, superposed_weights(model, bank, alphas), x), dim=1)[0]
    return AlphaReadout(alphas.cpu(), probs.cpu(), float(value), grad.cpu())


def one_shot_step(grad: torch.Tensor) -> torch.Tensor:
    """One-Shot as one Frank–Wolfe step of size 1: all weight on the task with the most negative ∂H/∂α."""
    alphas = torch.zeros_like(grad)
    alphas[grad.argmin()] = 1.0
    return alphas


def binary_step(alphas: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One binary-search step: of the tasks with α > 0 (all, if none), keep the ⌈k/2⌉ with the smallest
    ∂H/∂α and spread α uniformly over them."""
    candidates = torch.nonzero(alphas > 0).squeeze(1)
    candidates = torch.arange(alphas.numel()) if candidates.numel() == 0 else candidates
    kept = binary_search_step(grad, candidates)
    out = torch.zeros_like(alphas)
    out[kept] = 1.0 / kept.numel()
    return out


def image_html(x: torch.Tensor, caption: str, size: int = 112) -> str:
    """One square grayscale image as an inline PNG (a data URI: it needs no file and survives in saved widget
    state), ``size`` pixels wide, nearest-neighbour upscaled, with a caption. x: (1, n²) or (1, 1, n, n)."""
    from matplotlib.image import imsave

    side = math.isqrt(x.numel())
    if side * side != x.numel():
        raise ValueError(f"image_html shows square grayscale images, got {x.numel()} values {tuple(x.shape)}")
    buffer = io.BytesIO()
    imsave(buffer, x.detach().float().reshape(side, side).cpu().numpy(), cmap="gray", format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<div style="text-align:center;font-size:11px"><img src="data:image/png;base64,{data}" '
            f'width="{size}" height="{size}" style="image-rendering:pixelated;border:1px solid #888"><br>'
            f'{html.escape(caption)}</div>')


def bars_html(values: Sequence[float], labels: Sequence[str], title: str, highlight: int | None = None,
              width: int = 220) -> str:
    """A small horizontal bar chart as HTML (signed values grow left or right of a centre line)."""
    values = [float(v) for v in values]
    scale = max([abs(v) for v in values] + [1e-12])
    signed = any(v < 0 for v in values)
    rows = []
    for i, (label, value) in enumerate(zip(labels, values)):
        length = int(round(width / (2 if signed else 1) * abs(value) / scale))
        colour = "#c0392b" if i == highlight else ("#2e86c1" if value >= 0 else "#e67e22")
        bar = f'<span style="display:inline-block;height:10px;width:{length}px;background:{colour}"></span>'
        if signed:
            half = width // 2
            left = (f'<span style="display:inline-block;width:{half - length}px"></span>{bar}' if value < 0
                    else f'<span style="display:inline-block;width:{half}px"></span>{bar}')
            bar = left
        rows.append(f'<div style="font-family:monospace;font-size:11px;white-space:nowrap">'
                    f'{html.escape(label):>6} {bar} {value:+.4f}</div>')
    return f"<b>{html.escape(title)}</b>" + "".join(rows)


class AlphaExplorer:
    """Sliders for α (one per task, ≤ ``MAX_TASKS``), a "normalise Σα = 1" toggle, an image picker (task,
    index), the picked image as the network sees it, live bars of the output distribution and of ∂H/∂α, the entropy, and buttons that apply One-Shot,
    a binary-search step, or reset α to uniform. ``readout`` always holds the numbers on display; in a degenerate
    state (all α = 0, a slider at NaN) it is None, the status line says why, the step buttons do nothing, and the
    next valid change redraws. When every ∂H/∂α is equal the readout names no steepest task, and says so."""

    def __init__(self, model: nn.Module, bank: MaskBank, stream: TaskStream, task: int = 0, index: int = 0,
                 normalise: bool = True) -> None:
        if not 1 <= len(bank) <= MAX_TASKS:
            raise ValueError(f"the explorer shows 1..{MAX_TASKS} tasks (one slider each); the bank has {len(bank)}")
        self.model, self.bank, self.stream = model, bank, stream
        tasks = len(bank)
        self.sliders = [widgets.FloatSlider(value=1.0 / tasks, min=0.0, max=1.0, step=0.01, description=f"α{t}",
                                            continuous_update=False, readout_format=".2f") for t in range(tasks)]
        self.normalise = widgets.Checkbox(value=normalise, description="normalise Σα = 1")
        self.task = widgets.Dropdown(options=list(range(stream.num_tasks)), value=stream.check_task(task),
                                     description="image task")
        self.index = widgets.BoundedIntText(value=index, min=0, max=stream.test_set(task)[1].shape[0] - 1,
                                            description="index")
        self.one_shot_button = widgets.Button(description="one-shot step")
        self.binary_button = widgets.Button(description="binary step")
        self.reset_button = widgets.Button(description="uniform α")
        self.status = widgets.HTML()
        self.image_view = widgets.HTML()
        self.output_bars = widgets.HTML()
        self.grad_bars = widgets.HTML()
        self._holding = False
        self.readout: AlphaReadout | None = None
        for control in [*self.sliders, self.normalise, self.task, self.index]:
            control.observe(self.update, names="value")
        self.one_shot_button.on_click(lambda _: self._step(lambda r: one_shot_step(r.grad)))
        self.binary_button.on_click(lambda _: self._step(lambda r: binary_step(r.alphas, r.grad)))
        self.reset_button.on_click(lambda _: self.set_alphas([1.0 / tasks] * tasks))
        self.update()

    # --- state ------------------------------------------------------------------------------------
    def image(self) -> tuple[torch.Tensor, int]:
        """The picked test image (1, 784), as the network sees it (the task's transform applied), and its label."""
        x, y = self.stream.test_set(self.task.value)
        index = min(self.index.value, y.shape[0] - 1)
        return x[index:index + 1], int(y[index])

    def raw_alphas(self) -> list[float]:
        return [slider.value for slider in self.sliders]

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Change several controls with one update at the end."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        self.update()

    def _step(self, rule: Callable[[AlphaReadout], torch.Tensor]) -> None:
        """Apply a search step to the current readout; in a degenerate state leave α as it is (the readout says
        why)."""
        if self.readout is not None and self.readout.steepest is not None:
            self.set_alphas(rule(self.readout).tolist())

    def set_alphas(self, values: Sequence[float]) -> None:
        """Move the sliders to ``values`` (one update)."""
        with self._hold():
            for slider, value in zip(self.sliders, values):
                slider.value = round(float(value), 2)

    # --- display ----------------------------------------------------------------------------------
    def update(self, change: object = None) -> None:
        """Recompute the readout from the controls and redraw."""
        if self._holding:
            return
        x, label = self.image()
        self.image_view.value = image_html(x, f"input: task {self.task.value}, #{self.index.value}, label {label}")
        try:
            alphas = effective_alphas(self.raw_alphas(), self.normalise.value)
        except ValueError as err:
            return self._show_problem(str(err))
        if not bool(alphas.any()):
            return self._show_problem("all α are 0: the superposed network has no weights and its output says "
                                      "nothing; move a slider or press “uniform α”")
        self.readout = readout = alpha_readout(self.model, self.bank, x, alphas)
        steepest = (f"steepest descent: task <b>{readout.steepest}</b>" if readout.problem is None
                    else f"<span style='color:#c0392b'>{html.escape(readout.problem)}</span>")
        self.status.value = (f"H = <b>{readout.entropy:.3f}</b> nats (max log s = "
                             f"{torch.log(torch.tensor(float(readout.probs.numel()))):.3f}) · "
                             f"{steepest} · image from task {self.task.value}, label {label} · α = "
                             f"[{', '.join(f'{a:.2f}' for a in readout.alphas.tolist())}]")
        shown = min(readout.probs.numel(), 20)
        self.output_bars.value = bars_html(readout.probs[:shown].tolist(), [str(j) for j in range(shown)],
                                           f"output distribution p (first {shown} of {readout.probs.numel()})",
                                           highlight=int(readout.probs.argmax()))
        self.grad_bars.value = bars_html(readout.grad.tolist(), [f"α{t}" for t in range(readout.grad.numel())],
                                         "∂H/∂α", highlight=readout.steepest)

    def _show_problem(self, message: str) -> None:
        """A degenerate state: no readout, the reason in the status line, empty bars (the next valid change
        redraws everything)."""
        self.readout = None
        self.status.value = f"<span style='color:#c0392b'>{html.escape(message)}</span>"
        self.output_bars.value = self.grad_bars.value = ""

    @property
    def widget(self) -> widgets.Widget:
        """The whole explorer as one box."""
        controls = widgets.VBox([*self.sliders, self.normalise, self.task, self.index,
                                 widgets.HBox([self.one_shot_button, self.binary_button, self.reset_button])])
        return widgets.VBox([self.status, widgets.HBox([controls, self.image_view, self.output_bars,
                                                         self.grad_bars])])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
