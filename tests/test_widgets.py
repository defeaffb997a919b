"""The α explorer, headless: set slider values and click buttons, then check the numbers it shows against the
pure functions (observers run synchronously, no browser)."""
import pytest
import torch

from supsup_lite.core.inference import alpha_gradient, one_shot
from supsup_lite.notebook.widgets import (MAX_TASKS, AlphaExplorer, alpha_readout, bars_html, binary_step,
                                          effective_alphas, one_shot_step)


@pytest.fixture
def explorer(trained_bank, permuted):
    model, bank = trained_bank
    return AlphaExplorer(model, bank, permuted, task=2, index=3)


def test_readout_matches_the_pure_functions(explorer, trained_bank, permuted):
    model, bank = trained_bank
    explorer.sliders[0].value = 0.7
    x, _ = permuted.test_set(2)
    alphas = effective_alphas([0.7, 0.25, 0.25, 0.25], normalise=True)
    expected = alpha_readout(model, bank, x[3:4], alphas)
    torch.testing.assert_close(explorer.readout.alphas, alphas)
    torch.testing.assert_close(explorer.readout.grad, expected.grad)
    assert explorer.readout.entropy == pytest.approx(expected.entropy)
    assert f"{expected.entropy:.3f}" in explorer.status.value
    assert abs(explorer.readout.probs.sum().item() - 1) < 1e-5
    _, grad = alpha_gradient(model, bank, x[3:4], alphas=alphas)
    torch.testing.assert_close(explorer.readout.grad, grad)


def test_normalise_toggle(explorer):
    explorer.set_alphas([0.5, 0.5, 0.5, 0.5])
    assert explorer.readout.alphas.sum().item() == pytest.approx(1.0)
    explorer.normalise.value = False
    assert explorer.readout.alphas.tolist() == [0.5, 0.5, 0.5, 0.5]


def test_buttons_apply_one_shot_and_binary_steps(explorer):
    grad = explorer.readout.grad
    explorer.one_shot_button.click()
    assert explorer.raw_alphas() == one_shot_step(grad).tolist()
    assert explorer.raw_alphas()[int(grad.argmin())] == 1.0
    explorer.reset_button.click()
    assert explorer.raw_alphas() == [0.25] * 4
    explorer.binary_button.click()
    assert sum(a > 0 for a in explorer.raw_alphas()) == 2
    explorer.binary_button.click()
    assert sum(a > 0 for a in explorer.raw_alphas()) == 1
    explorer.binary_button.click()  # one candidate left: stays put
    assert sum(a > 0 for a in explorer.raw_alphas()) == 1


def test_one_shot_button_from_uniform_equals_library_one_shot(explorer, trained_bank):
    model, bank = trained_bank
    for task in range(4):
        explorer.task.value = task
        explorer.reset_button.click()
        explorer.one_shot_button.click()
        x, _ = explorer.image()
        assert explorer.raw_alphas().index(1.0) == one_shot(model, bank, x)


def test_pure_steps():
    grad = torch.tensor([0.3, -0.2, -0.5, 0.1])
    assert one_shot_step(grad).tolist() == [0, 0, 1, 0]
    assert binary_step(torch.full((4,), 0.25), grad).tolist() == [0, 0.5, 0.5, 0]
    assert binary_step(torch.zeros(4), grad).tolist() == [0, 0.5, 0.5, 0]  # no candidate: start from all
    assert binary_step(torch.tensor([0.0, 1.0, 0.0, 0.0]), grad).tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="≥ 0"):
        effective_alphas([-0.1, 1.0], normalise=True)
    assert effective_alphas([0.0, 0.0], normalise=True).tolist() == [0.0, 0.0]
    assert "+0.3000" in bars_html(grad.tolist(), list("abcd"), "grad")


def test_too_many_tasks_is_a_clear_error(trained_bank, permuted):
    model, bank = trained_bank

    class Big:
        def __len__(self):
            return MAX_TASKS + 1

    with pytest.raises(ValueError, match="1..10 tasks"):
        AlphaExplorer(model, Big(), permuted)
