import math

import pytest
import torch

from supsup_lite.core.models import (build_model, frozen_random_model, maskable_parameters, masked_forward,
                                     signed_constant_)


def test_signed_constant_values_and_freezing():
    model = frozen_random_model("lenet_300_100", 100, seed=3, device="cpu")
    params = maskable_parameters(model)
    assert list(params) == ["1.weight", "3.weight", "5.weight"]
    assert [tuple(p.shape) for p in params.values()] == [(300, 784), (100, 300), (100, 100)]
    for weight in params.values():
        c = math.sqrt(2.0 / weight.shape[1])
        assert torch.allclose(weight.abs(), torch.full_like(weight, c))
        assert abs((weight > 0).float().mean().item() - 0.5) < 0.02
        assert not weight.requires_grad
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in model.modules())


def test_signed_constant_is_seeded():
    a = frozen_random_model("lenet_300_100", seed=1, device="cpu")
    b = frozen_random_model("lenet_300_100", seed=1, device="cpu")
    c = frozen_random_model("lenet_300_100", seed=2, device="cpu")
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)


def test_fc_1024_shapes_and_unknown_names():
    model = build_model("fc_1024_1024", 500)
    assert [tuple(p.shape) for p in maskable_parameters(model).values()] == [(1024, 784), (1024, 1024), (500, 1024)]
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="num_outputs"):
        build_model("lenet_300_100", 0)


def test_masked_forward_equals_plain_forward_with_masked_layers():
    model = signed_constant_(build_model("lenet_300_100"), torch.Generator().manual_seed(0))
    x = torch.randn(4, 784)
    masks = {n: torch.rand(p.shape) < 0.5 for n, p in maskable_parameters(model).items()}
    h = x
    for i, (name, w) in enumerate(maskable_parameters(model).items()):
        h = h @ (w * masks[name]).T
        h = h.relu() if i < 2 else h
    weights = {n: p * masks[n] for n, p in maskable_parameters(model).items()}
    assert torch.allclose(masked_forward(model, weights, x), h, atol=1e-5)
    assert torch.equal(masked_forward(model, None, x), model(x))
