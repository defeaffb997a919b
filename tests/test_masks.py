import math

import pytest
import torch

from supsup_lite.core.masks import apply_masks, init_scores, supermask_weight, threshold_supermask, topk_supermask
from supsup_lite.core.models import frozen_random_model, maskable_parameters


def test_scores_are_kaiming_uniform():
    model = frozen_random_model("lenet_300_100", seed=0, device="cpu")
    scores = init_scores(model, torch.Generator().manual_seed(0))
    for name, s in scores.items():
        bound = 1 / math.sqrt(s.shape[1])
        assert s.requires_grad and s.shape == maskable_parameters(model)[name].shape
        assert s.abs().max() <= bound and s.abs().max() > 0.95 * bound
        assert abs((s >= 0).float().mean().item() - 0.5) < 0.03


def test_threshold_mask_and_straight_through_gradient():
    s = torch.tensor([-0.5, 0.0, 0.3, -1e-9], requires_grad=True)
    mask = threshold_supermask(s)
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0]
    upstream = torch.tensor([1.0, -2.0, 3.0, 4.0])
    (mask * upstream).sum().backward()
    assert torch.equal(s.grad, upstream)  # identity: ∂L/∂s = ∂L/∂M


def test_fused_supermask_weight_matches_unfused_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    w, s = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    upstream = torch.randn(30, 20, generator=g)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    fused, plain = supermask_weight(w, s1), w * threshold_supermask(s2)
    assert torch.equal(fused, plain)
    (fused * upstream).sum().backward()
    (plain * upstream).sum().backward()
    assert torch.allclose(s1.grad, s2.grad) and torch.allclose(s1.grad, upstream * w)


@pytest.mark.parametrize("keep_frac", [0.05, 0.5, 1.0])
def test_topk_keeps_the_largest_magnitudes(keep_frac):
    s = torch.randn(1000, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = topk_supermask(s, keep_frac)
    kept = 1000 - int((1 - keep_frac) * 1000)
    assert int(mask.sum()) == kept
    assert s.detach().abs()[mask.bool()].min() >= s.detach().abs()[~mask.bool()].max() if kept < 1000 else True
    upstream = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    (mask * upstream).sum().backward()
    assert torch.equal(s.grad, s.detach().sign() * upstream)  # straight through |s|, as GetSubnet(s.abs())


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_topk_rejects_fractions_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        topk_supermask(torch.randn(10), bad)


def test_apply_masks_rejects_unknown_parameters():
    model = frozen_random_model("lenet_300_100", device="cpu")
    with pytest.raises(KeyError, match="does not have"):
        apply_masks(model, {"fc9.weight": torch.ones(3)})
