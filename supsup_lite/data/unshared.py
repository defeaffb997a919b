"""The scenario without shared labels (GNu, van de Ven & Tolias' "class-incremental" learning).

:class:`UnsharedLabels` turns a task stream into it: task t's digit y becomes class C·t + y, so a method that gets
the digit right but the task wrong scores zero.
"""
from __future__ import annotations


import torch

from .mnist import Batch, Batches, TaskStream





# --- scenario without shared labels --------------------------------------------------------------------------
class UnsharedLabels(TaskStream):
    """A view of ``base`` in which task t's label y becomes C·t + y (C = ``base.num_classes``): C·T classes.

    The inputs and their order are the base stream's (no data is copied). With the task withheld at test time
    this is scenario GNu (van de Ven & Tolias' "class-incremental" learning): predicting the right digit
    with the wrong task counts as wrong.
    """

    def __init__(self, base: TaskStream) -> None:  # the data stays in ``base``: no TaskStream.__init__
        if isinstance(base, UnsharedLabels):
            raise TypeError("the stream's labels are already unshared")
        self.base = base
        self.name = f"{base.name}, labels not shared"
        self.num_tasks, self.device = base.num_tasks, base.device
        self.classes_per_task = base.num_classes
        self.num_classes = base.num_classes * base.num_tasks

    def __repr__(self) -> str:
        return f"UnsharedLabels({self.base!r})"

    def fingerprint(self) -> dict:  # noqa: D102
        return {**self.base.fingerprint(), "labels": "unshared"}

    def check_task(self, task: int) -> int:  # noqa: D102
        return self.base.check_task(task)

    def transform(self, task: int, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.base.transform(task, x)

    def shift(self, task: int, y: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s labels y (N,) → C·task + y."""
        return y + self.classes_per_task * self.check_task(task)

    def test_set(self, task: int) -> Batch:  # noqa: D102
        x, y = self.base.test_set(task)
        return x, self.shift(task, y)

    def train_set(self, task: int) -> Batch:  # noqa: D102
        x, y = self.base.train_set(task)
        return x, self.shift(task, y)

    def num_train(self, task: int) -> int:  # noqa: D102
        return self.base.num_train(task)

    def train_batches(self, task: int, batch_size: int = 128, num_batches: int | None = None,
                      seed: int = 0) -> Batches:  # noqa: D102
        batches = self.base.train_batches(task, batch_size, num_batches, seed)
        return batches.map(lambda batch: (batch[0], self.shift(task, batch[1])))


