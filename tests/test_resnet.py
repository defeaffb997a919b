"""GEM ResNet-18: shapes and parameter count, signed-constant weights, ER densities, per-task BatchNorm buffers."""
from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from supsup_lite.core.masks import topk_supermask
from supsup_lite.core.models import maskable_parameters
from supsup_lite.scenarios.resnet import (batchnorm_stats, er_densities, er_density, frozen_gem_resnet18,
                                          gem_resnet18, kept_weights)


@pytest.fixture(scope="module")
def tiny():
    """A width-4 GEM ResNet-18 (same topology, 1/25 of the weights) frozen with seed 0."""
    return frozen_gem_resnet18(num_outputs=5, width=4, seed=0, device="cpu")


def expected_gem_weights(width: int, outputs: int) -> int:
    """Hand count: stem, 4 stages of 2 BasicBlocks (1×1 shortcut on stages 2–4), 1×1 head."""
    total, c_in = 3 * width * 9, width
    for stage in range(4):
        c = width * 2 ** stage
        total += c_in * c * 9 + c * c * 9 + (c_in * c if c_in != c else 0)  # first block (+ shortcut)
        total += 2 * c * c * 9                                                # second block
        c_in = c
    return total + c_in * outputs


def test_paper_model_has_1_09m_maskable_weights_and_no_biases():
    model = gem_resnet18(num_outputs=5)
    params = maskable_parameters(model)
    total = sum(p.numel() for p in params.values())
    assert total == expected_gem_weights(20, 5) == 1_090_940
    assert len(params) == 21  # stem + 16 block convs + 3 shortcuts + head
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 20 and not any(bn.affine for bn in bns)
    assert [p.shape for p in params.values()][-1] == (5, 160, 1, 1)


def test_forward_shapes_and_input_check(tiny):
    assert tiny(torch.randn(3, 3, 32, 32)).shape == (3, 5)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tiny(torch.randn(3, 3 * 32 * 32))


def test_signed_constant_weights(tiny):
    for name, w in maskable_parameters(tiny).items():
        c = math.sqrt(2.0 / math.prod(w.shape[1:]))
        assert not w.requires_grad
        assert torch.allclose(w.abs(), torch.full_like(w, c)), name
        if w.numel() >= 200:
            assert 0.35 < (w > 0).float().mean().item() < 0.65, name
    again = frozen_gem_resnet18(num_outputs=5, width=4, seed=0, device="cpu")
    other = frozen_gem_resnet18(num_outputs=5, width=4, seed=1, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(maskable_parameters(tiny).values(),
                                                  maskable_parameters(again).values()))
    assert not torch.equal(tiny.layer4[1].conv2.weight, other.layer4[1].conv2.weight)


@pytest.mark.parametrize("shape, budget, expected", [
    ((20, 3, 3, 3), 1, 23 / 540),            # stem: (20 + 3) / (20·3·9)
    ((20, 3, 3, 3), 16, 0.5),                # 16·23/540 = 0.68 → capped at 0.5
    ((160, 160, 3, 3), 8, 8 * 320 / 230400),
    ((80, 40, 1, 1), 4, 4 * 120 / 3200),     # shortcut: 0.15
    ((5, 160, 1, 1), 1, 165 / 800),          # head
    ((5, 160, 1, 1), 4, 0.5),
    ((100, 300), 2, 2 * 400 / 30000),        # a linear layer
])
def test_er_density_matches_hand_computed(shape, budget, expected):
    assert er_density(shape, budget) == pytest.approx(expected, rel=1e-12)


def test_er_density_rejects_bad_input():
    with pytest.raises(ValueError, match="budget"):
        er_density((4, 4, 3, 3), 0)
    with pytest.raises(ValueError, match="c_out, c_in"):
        er_density((4, 4, 3), 1)


def test_er_densities_cover_every_layer_and_match_topk(tiny):
    densities = er_densities(tiny, budget=2)
    params = maskable_parameters(tiny)
    assert set(densities) == set(params)
    kept = 0
    for name, w in params.items():
        mask = topk_supermask(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)), densities[name])
        kept += int(mask.sum())
    assert kept == kept_weights(tiny, densities)


def test_batchnorm_stats_are_fresh_and_cover_every_bn(tiny):
    stats = batchnorm_stats(tiny)
    buffers = dict(tiny.named_buffers())
    assert set(stats) == set(buffers)
    for name, t in stats.items():
        assert t.shape == buffers[name].shape and t.data_ptr() != buffers[name].data_ptr()
        fresh = 1.0 if name.endswith("running_var") else 0.0
        assert torch.all(t == fresh), name


def test_functional_call_updates_only_the_given_bn_buffers(tiny):
    """A training-mode forward writes the running statistics into the passed buffers, not the module's."""
    weights = maskable_parameters(tiny)
    before = {n: b.clone() for n, b in tiny.named_buffers()}
    stats = batchnorm_stats(tiny)
    tiny.train()
    try:
        functional_call(tiny, {**weights, **stats}, (torch.randn(8, 3, 32, 32),))
    finally:
        tiny.eval()
    assert all(torch.equal(b, before[n]) for n, b in tiny.named_buffers())
    assert int(stats["bn1.num_batches_tracked"]) == 1
    assert not torch.all(stats["layer4.1.bn2.running_mean"] == 0)


def test_shared_batchnorm_changes_an_earlier_task_but_per_task_stats_do_not(tiny):
    """The shared-BatchNorm bug of the authors' first release (their issues #11, #15) with two random masks and two input distributions (no training needed)."""
    g = torch.Generator().manual_seed(0)
    params = maskable_parameters(tiny)
    densities = er_densities(tiny, budget=4)
    masked = [{n: w * topk_supermask(torch.randn(w.shape, generator=g), densities[n]) for n, w in params.items()}
              for _ in range(2)]
    data = [torch.randn(16, 3, 32, 32, generator=g), 3 + 2 * torch.randn(16, 3, 32, 32, generator=g)]

    def fit_stats(task: int, stats: dict) -> None:  # a few training-mode forwards = what training does to BN
        tiny.train()
        for _ in range(3):
            functional_call(tiny, {**masked[task], **stats}, (data[task],))
        tiny.eval()

    def task0_logits(stats: dict) -> torch.Tensor:
        return functional_call(tiny, {**masked[0], **stats}, (data[0],))

    per_task = [batchnorm_stats(tiny), batchnorm_stats(tiny)]
    fit_stats(0, per_task[0])
    reference = task0_logits(per_task[0])
    fit_stats(1, per_task[1])
    assert torch.equal(task0_logits(per_task[0]), reference)

    shared = batchnorm_stats(tiny)
    fit_stats(0, shared)
    assert torch.equal(task0_logits(shared), reference)  # same start, same data: same statistics
    fit_stats(1, shared)
    assert not torch.allclose(task0_logits(shared), reference, atol=1e-3)
