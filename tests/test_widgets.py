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


# --- degenerate states: a message in the readout, and recovery on the next valid change ------------------------
def test_all_alphas_zero_is_a_message_and_recovers(explorer):
    explorer.normalise.value = False
    explorer.set_alphas([0.0] * 4)
    assert explorer.readout is None
    assert "all α are 0" in explorer.status.value and "steepest descent" not in explorer.status.value
    assert explorer.output_bars.value == explorer.grad_bars.value == ""
    explorer.one_shot_button.click()  # nothing to step from: α stays as it is
    explorer.binary_button.click()
    assert explorer.raw_alphas() == [0.0] * 4
    explorer.sliders[2].value = 0.5
    assert explorer.readout is not None and explorer.readout.alphas.tolist() == [0.0, 0.0, 0.5, 0.0]
    assert f"steepest descent: task <b>{explorer.readout.steepest}</b>" in explorer.status.value


def test_a_nan_slider_is_a_message_and_recovers(explorer):
    explorer.sliders[1].value = float("nan")
    assert explorer.readout is None
    assert "α must be finite numbers, but α1 = [nan]: set it to a number in [0, 1]" in explorer.status.value
    explorer.reset_button.click()
    assert explorer.readout is not None and explorer.raw_alphas() == [0.25] * 4
    assert "steepest descent: task" in explorer.status.value
    explorer.sliders[3].value = float("nan")
    explorer.sliders[3].value = 0.1
    assert explorer.readout is not None and "steepest descent: task" in explorer.status.value


def test_equal_gradients_name_no_steepest_task(trained_bank, permuted):
    model, bank = trained_bank
    same = type(bank).for_model(model)
    for _ in range(3):
        same.append(bank.get(0, torch.bool))  # three copies of one mask: every ∂H/∂α is the same number
    explorer = AlphaExplorer(model, same, permuted)
    grad = explorer.readout.grad
    assert (grad.max() - grad.min()).item() <= 1e-5 * grad.abs().max().item()  # equal up to float rounding
    assert explorer.readout.steepest is None
    assert "every ∂H/∂α is equal, so no task is steeper" in explorer.status.value
    assert "steepest descent: task" not in explorer.status.value
    explorer.one_shot_button.click()
    assert explorer.raw_alphas() == [1 / 3] * 3  # no step taken
    explorer.sliders[0].value = 0.0  # still one mask: still no steepest task, still said so
    assert explorer.readout.steepest is None and "every ∂H/∂α is equal" in explorer.status.value


@pytest.mark.parametrize("raw", [[float("nan"), 0.5], [0.5, float("inf")]])
def test_effective_alphas_refuses_non_finite_values(raw):
    with pytest.raises(ValueError, match="α must be finite numbers"):
        effective_alphas(raw, normalise=True)


def test_the_explorer_shows_the_image_it_classifies(explorer, permuted):
    import base64
    import io

    from matplotlib.image import imread

    x, y = permuted.test_set(2)
    value = explorer.image_view.value
    assert f"input: task 2, #3, label {int(y[3])}" in value
    png = base64.b64decode(value.split("data:image/png;base64,", 1)[1].split('"', 1)[0])
    shown = torch.from_numpy(imread(io.BytesIO(png))[..., 0].copy())  # gray: R = G = B, scaled to [0, 1]
    image = x[3].view(28, 28)
    expected = (image - image.min()) / (image.max() - image.min())
    assert shown.shape == (28, 28)
    assert (shown - expected).abs().max() < 1 / 255 + 1e-6  # the pixels themselves, to 8 bits
    explorer.index.value = 5
    assert f"#5, label {int(y[5])}" in explorer.image_view.value
    explorer.normalise.value = False
    explorer.set_alphas([0.0] * 4)  # a degenerate state still shows the image
    assert explorer.readout is None and "#5" in explorer.image_view.value
