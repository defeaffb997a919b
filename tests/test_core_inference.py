"""Task inference on really trained masks, through the public core API."""
import torch

from supsup_lite.core.inference import binary_search, binary_search_step, one_shot


def test_one_shot_and_binary_find_the_task_of_a_batch(trained_bank, permuted):
    model, bank = trained_bank
    for task in range(len(bank)):
        x, _ = permuted.test_set(task)
        assert one_shot(model, bank, x[:32]) == task
        assert binary_search(model, bank, x[:32]) == task


def test_binary_step_halves_even_on_ties():
    grad = torch.zeros(7)
    kept = binary_search_step(grad, torch.arange(7))
    assert kept.tolist() == [0, 1, 2, 3]
    grad = torch.tensor([3.0, -1.0, 2.0, -1.0])
    assert binary_search_step(grad, torch.arange(4)).tolist() == [1, 3]
