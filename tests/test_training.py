import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_lite.core.masks import apply_masks, final_masks, init_scores, supermask_weight, topk_supermask
from supsup_lite.core.models import (build_model, frozen_random_model, maskable_parameters, masked_forward,
                                     signed_constant_)
from supsup_lite.core.training import (TrainResult, evaluate, fit, mlp_weights, predict, task_losses,
                                       task_losses_and_logit_gradient, train_dense, train_supermask,
                                       train_supermasks)


def reference_scores(model: nn.Module, batches, *, seed: int, keep_frac: float | None = None,
                     classes: int | None = None) -> dict:
    """The plain recipe: autograd through the masked forward and torch.optim.RMSprop on the scores (cross-entropy
    over the first ``classes`` logits; None: all)."""
    params = maskable_parameters(model)
    scores = init_scores(model, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.RMSprop(scores.values(), lr=1e-4)
    for x, y in batches:
        weights = {n: supermask_weight(params[n], s) if keep_frac is None else params[n] * topk_supermask(s, keep_frac)
                   for n, s in scores.items()}
        loss = F.cross_entropy(masked_forward(model, weights, x)[:, :classes], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return scores


@pytest.mark.parametrize("keep_frac", [None, 0.3])
def test_fast_mlp_step_equals_the_plain_autograd_loop_bit_for_bit(permuted_on, keep_frac, device):
    model = frozen_random_model("lenet_300_100", 10, seed=1, device=device)
    assert mlp_weights(model) is not None  # the hand-written step is the one under test
    batches = permuted_on.train_batches(2, 64, 30, 7)
    ours = train_supermask(model, batches, seed=7, keep_frac=keep_frac, progress=False)
    expected = final_masks(reference_scores(model, batches, seed=7, keep_frac=keep_frac), keep_frac=keep_frac)
    for name in expected:
        assert torch.equal(ours.masks[0][name], expected[name]), name


@pytest.mark.parametrize("chunk", [1, 3])
def test_loss_over_the_real_classes_only_equals_the_plain_loop_and_leaves_superfluous_rows_untrained(permuted,
                                                                                                      chunk):
    model = frozen_random_model("lenet_300_100", 30, seed=1, device="cpu")
    batches = [permuted.train_batches(t, 64, 20, 7 + t) for t in range(3)]
    ours = train_supermasks(model, batches, seeds=[7, 8, 9], classes=10, chunk=chunk, progress=False)
    for k in range(3):
        expected = final_masks(reference_scores(model, batches[k], seed=7 + k, classes=10))
        assert all(torch.equal(ours.masks[k][n], expected[n]) for n in expected)
        initial = init_scores(model, torch.Generator().manual_seed(7 + k))["5.weight"] >= 0
        assert torch.equal(ours.masks[k]["5.weight"][10:], initial[10:])   # no gradient reached them
        assert not torch.equal(ours.masks[k]["5.weight"][:10], initial[:10])
    full = train_supermasks(model, batches, seeds=[7, 8, 9], chunk=chunk, progress=False)
    assert not torch.equal(full.masks[0]["1.weight"], ours.masks[0]["1.weight"])  # the superfluous terms matter


def test_real_class_loss_on_a_wider_head_gives_the_masks_of_the_ten_output_network(permuted):
    # the s-output network nests the 10-output one (same generator draws), so without the superfluous terms in
    # the loss its masks are those of s = 10, bit for bit, on the shared weights
    narrow = train_supermask(frozen_random_model("lenet_300_100", 10, seed=0), permuted.train_batches(0, 64, 25, 3),
                             seed=3, progress=False).masks[0]
    wide = train_supermask(frozen_random_model("lenet_300_100", 60, seed=0), permuted.train_batches(0, 64, 25, 3),
                           seed=3, classes=10, progress=False).masks[0]
    assert all(torch.equal(wide[n][:narrow[n].shape[0]], narrow[n]) for n in narrow)


def test_real_class_loss_refuses_a_bad_number_of_classes(permuted):
    model = frozen_random_model("lenet_300_100", 30, seed=1, device="cpu")
    with pytest.raises(ValueError, match=r"classes=31 exceeds the model's 30 outputs; give 1..30"):
        train_supermask(model, permuted.train_batches(0, 64, 2, 0), seed=0, classes=31, progress=False)
    with pytest.raises(ValueError, match=r"classes \(logits in the loss, of the model's 30\) must be ≥ 1"):
        train_supermask(model, permuted.train_batches(0, 64, 2, 0), seed=0, classes=0, progress=False)
    with pytest.raises(TypeError, match="must be an int"):
        train_supermask(model, permuted.train_batches(0, 64, 2, 0), seed=0, classes=10.0, progress=False)


@pytest.mark.parametrize("classes", [None, 2])
def test_any_other_network_trains_through_autograd_with_the_same_recipe(classes):
    net = nn.Sequential(nn.Conv2d(1, 3, 5, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 24 * 24, 4, bias=False))
    signed_constant_(net, torch.Generator().manual_seed(0))
    assert mlp_weights(net) is None
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, classes or 4, (16,), generator=g))
               for _ in range(8)]
    ours = train_supermask(net, batches, seed=5, classes=classes, progress=False)
    expected = final_masks(reference_scores(net, batches, seed=5, classes=classes))
    assert all(torch.equal(ours.masks[0][n], expected[n]) for n in expected)


def test_mlp_weights_recognises_only_bias_free_relu_mlps():
    assert len(mlp_weights(build_model("fc_1024_1024"))) == 3
    assert mlp_weights(nn.Sequential(nn.Linear(4, 3, bias=False))) is not None
    assert mlp_weights(nn.Sequential(nn.Linear(4, 3))) is None  # bias
    assert mlp_weights(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False))) is None
    assert mlp_weights(nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU())) is None  # ends in a ReLU


def test_supermask_training_learns_and_never_changes_weights(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    before = {n: p.clone() for n, p in maskable_parameters(model).items()}
    x, y = permuted.test_set(0)
    chance = evaluate(model, None, x, y)
    result = train_supermask(model, permuted.train_batches(0, 128, 120, 0), seed=0, progress=False)
    assert isinstance(result, TrainResult) and len(result.masks) == 1 and result.seconds > 0
    masks, history = result.masks[0], result.history[0]
    assert all(torch.equal(before[n], p) for n, p in maskable_parameters(model).items())
    assert all(m.dtype == torch.bool and m.shape == before[n].shape for n, m in masks.items())
    accuracy = evaluate(model, apply_masks(model, masks), x, y)
    assert chance < 0.2 and accuracy > 0.75
    assert len(history.loss) == len(history.accuracy) == 120 and history.loss[-1] < history.loss[0]


def test_training_is_deterministic_given_the_seed(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    a, b, c = (train_supermask(model, permuted.train_batches(1, 128, 15, 5), seed=seed, progress=False).masks[0]
               for seed in (5, 5, 6))
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)


def test_topk_rule_keeps_the_requested_density(permuted):
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    result = train_supermask(model, permuted.train_batches(0, 128, 5, 0), seed=0, keep_frac=0.3, progress=False)
    for mask in result.masks[0].values():
        assert mask.sum().item() == mask.numel() - int(0.7 * mask.numel())


def test_unfrozen_base_is_refused(permuted):
    with pytest.raises(ValueError, match="frozen"):
        train_supermask(build_model("lenet_300_100"), permuted.train_batches(0, 128, 1), seed=0, progress=False)
    with pytest.raises(ValueError, match="no maskable"):
        train_supermasks(nn.Sequential(nn.ReLU()), [[]], seeds=[0], progress=False)


def test_dense_training_changes_weights_and_learns(permuted):
    torch.manual_seed(0)
    model = build_model("lenet_300_100")
    before = model[1].weight.detach().clone()
    result = train_dense(model, permuted.train_batches(0, 128, 60, 0), lr=1e-3, progress=False)
    x, y = permuted.test_set(0)
    assert result.masks == [] and len(result.history[0].loss) == 60
    assert not torch.equal(before, model[1].weight) and evaluate(model, None, x, y) > 0.8 and not model.training


def test_fit_calls_after_step_with_the_step_index():
    model = nn.Linear(3, 2)
    seen = []
    history = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), [(torch.randn(4, 3), torch.zeros(4).long())] * 3,
                  progress=False, after_step=seen.append)
    assert seen == [0, 1, 2] and len(history.loss) == 3


def test_evaluate_checks_sizes():
    model = frozen_random_model("lenet_300_100", device="cpu")
    with pytest.raises(ValueError, match="as many labels"):
        evaluate(model, None, torch.zeros(3, 784), torch.zeros(2, dtype=torch.long))
def test_predict_over_the_real_classes_takes_the_argmax_of_the_first_logits_only():
    model = frozen_random_model("lenet_300_100", 30, seed=4, device="cpu")
    x = torch.randn(50, 784, generator=torch.Generator().manual_seed(0))
    logits = masked_forward(model, None, x)
    assert torch.equal(predict(model, None, x, 16, classes=10), logits[:, :10].argmax(1))
    assert torch.equal(predict(model, None, x), logits.argmax(1))
    assert (logits.argmax(1) >= 10).any()  # the untrained superfluous outputs do win sometimes: the test can fail
    with pytest.raises(ValueError, match=r"classes=31 must lie in 1..30 \(the model's outputs\)"):
        predict(model, None, x, classes=31)


@pytest.mark.parametrize("classes", [None, 4])
@pytest.mark.parametrize("batch, padded", [(128, False), (37, False), (37, True)])
def test_logit_gradient_without_a_graph_equals_autograd_bit_for_bit(batch, padded, classes):
    """The MLP step's closed-form ∂ΣCE/∂logits against autograd through task_losses: K = 3 tasks, a batch size
    that is a power of two or not, ragged tasks (valid rows), the loss over all outputs or the first 4."""
    g = torch.Generator().manual_seed(batch)
    logits = torch.randn(3, batch, 10, generator=g)
    y = torch.randint(0, 4, (3, batch), generator=g)
    valid = None
    if padded:
        valid = torch.ones(3, batch)
        valid[1, 20:] = 0
        valid[2] = 0  # a task without any example left
    leaf = logits.clone().requires_grad_(True)
    expected_losses = task_losses(leaf, y, valid, classes=classes)
    (expected_grad,) = torch.autograd.grad(expected_losses.sum(), leaf)
    losses, grad = task_losses_and_logit_gradient(logits, y, valid, classes=classes)
    assert torch.equal(losses, expected_losses.detach()) and torch.equal(grad, expected_grad)
