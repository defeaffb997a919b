"""The packed-bank superposition kernels against the plain float-stack reference (values and gradients): the CPU
numba kernels, the CUDA torch kernels (run here on CPU tensors), and the dense unpacking path."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import supsup_lite.core.superpose as sp
from supsup_lite.core import cpu_kernels
from supsup_lite.core.bits import pack_bits, unpack_bits
from supsup_lite.core.masks import MaskBank
from supsup_lite.core.models import frozen_random_model, maskable_parameters
from supsup_lite.core.superpose import (mask_counts, mask_counts_torch, masks_dot, masks_dot_torch, superposed_mask,
                                        superposed_mask_reference, superposed_weights, uniform_counts, unpack_float)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_packed(tasks: int, numel: int, seed: int, device: str = "cpu", density: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return pack_bits(torch.rand(tasks, numel, generator=g) < density).to(device)


@pytest.fixture(params=["kernels", "dense"])
def small_blocks(request, monkeypatch):
    """Both paths: the counting / byte-table kernels for any number of tasks (the torch kernels with tiny blocks, so
    every block boundary is crossed; the numba kernels' blocks are compiled in), or dense unpacking."""
    if request.param == "dense":
        monkeypatch.setattr(sp, "DENSE_MAX_TASKS", {"cpu": 10**9, "cuda": 10**9})
        return
    monkeypatch.setattr(sp, "ROWS_PER_COUNT", 3)
    monkeypatch.setattr(sp, "COLUMN_BLOCK", 16)
    monkeypatch.setattr(sp, "TABLE_BLOCK", 5)
    monkeypatch.setattr(sp, "GATHER_ROWS", 4)
    monkeypatch.setattr(sp, "DENSE_MAX_TASKS", {"cpu": 0, "cuda": 0})


ALPHAS = {
    "uniform": lambda t, g: torch.full((t,), 1.0 / t, dtype=torch.float64),
    "random": lambda t, g: torch.rand(t, generator=g, dtype=torch.float64) - 0.3,
    "subset": lambda t, g: (torch.rand(t, generator=g) < 0.5).double() / 3,
    "two_values": lambda t, g: torch.where(torch.rand(t, generator=g) < 0.5, 0.25, 0.75).double(),
    "zero": lambda t, g: torch.zeros(t, dtype=torch.float64),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tasks,numel", [(1, 1), (2, 7), (5, 64), (11, 203), (20, 1001)])
@pytest.mark.parametrize("kind", sorted(ALPHAS))
def test_forward_and_gradient_match_float_stack(device, tasks, numel, kind, small_blocks):
    g = torch.Generator().manual_seed(tasks * 1000 + numel)
    packed = random_packed(tasks, numel, seed=numel, device=device)
    alphas = ALPHAS[kind](tasks, g).to(device)
    upstream = torch.randn(numel, generator=g, dtype=torch.float64).to(device)
    ours_a = alphas.clone().requires_grad_(True)
    ref_a = alphas.clone().requires_grad_(True)
    ours = superposed_mask(packed, numel, ours_a)
    ref = superposed_mask_reference(packed, numel, ref_a)
    torch.testing.assert_close(ours, ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours_a.grad, ref_a.grad)


def test_float64_gradcheck_small():
    packed = random_packed(6, 29, seed=3)
    alphas = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: superposed_mask(packed, 29, a), (alphas,))


KERNELS = {"numba (CPU)": (mask_counts, masks_dot), "torch (CUDA path, on CPU)": (mask_counts_torch, masks_dot_torch)}


@pytest.mark.parametrize("kernels", sorted(KERNELS))
@pytest.mark.parametrize("numel", [1, 8, 63, 65, 1000])
def test_counts_and_dot_products_are_exact(numel, kernels, small_blocks):
    counts, dot = KERNELS[kernels]
    packed = random_packed(9, numel, seed=numel, density=0.7)
    masks = unpack_bits(packed, numel, torch.int32)
    assert torch.equal(counts(packed, numel), masks.sum(0))
    rows = torch.tensor([8, 0, 3])
    assert torch.equal(counts(packed, numel, rows), masks[rows].sum(0))
    vector = torch.randn(numel, dtype=torch.float64)
    torch.testing.assert_close(dot(packed, numel, vector), masks.double() @ vector)
    torch.testing.assert_close(dot(packed, numel, vector, rows), masks[rows].double() @ vector)


@pytest.mark.parametrize("kernels", sorted(KERNELS))
def test_kernels_on_a_bank_larger_than_every_block(kernels):
    """300 tasks > DENSE_MAX_TASKS, and not a whole number of either kernel's row groups (the dot products' last
    rows go one at a time, the counts' last group is short); 5,001 bytes per mask > one call of the masked sums
    (512 words of 2 bytes), with tail bytes after the last whole 64-byte chunk and pair of words: the numba
    kernels' real blocks (the torch kernels' at the small_blocks sizes of the other tests)."""
    counts, dot = KERNELS[kernels]
    tasks, numel = 300, 8 * 5000 + 3
    assert tasks > max(sp.DENSE_MAX_TASKS.values()) and tasks % cpu_kernels.DOT_ROWS and tasks % cpu_kernels.COUNT_ROWS
    assert numel // 8 > 2 * cpu_kernels.DOT_WORDS and (numel // 8) % 64
    packed = random_packed(tasks, numel, seed=5)
    masks = unpack_bits(packed, numel, torch.int32)
    rows = torch.randperm(tasks, generator=torch.Generator().manual_seed(0))[:280]
    assert torch.equal(counts(packed, numel), masks.sum(0))
    assert torch.equal(counts(packed, numel, rows), masks[rows].sum(0))
    vector = torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dot(packed, numel, vector, rows), masks[rows].double() @ vector)
    single = vector.float()  # float32 lane sums within a block, float64 over blocks: float32 tolerance
    torch.testing.assert_close(dot(packed, numel, single).double(), masks.double() @ single.double(),
                               rtol=1e-5, atol=1e-3)


def test_unpack_float_equals_unpack_bits():
    packed = random_packed(4, 77, seed=1)
    assert torch.equal(unpack_float(packed, 77), unpack_bits(packed, 77, torch.float32))


def test_default_blocks_over_127_tasks_leave_the_bank_untouched():
    packed = random_packed(130, 4000, seed=2)
    before = packed.clone()
    alphas = torch.full((130,), 1 / 130, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = superposed_mask(packed, 4000, alphas)
    (ours * upstream).sum().backward()
    assert torch.equal(packed, before)
    torch.testing.assert_close(ours, superposed_mask_reference(packed, 4000, alphas.detach()))
    torch.testing.assert_close(alphas.grad, unpack_bits(packed, 4000, torch.float64) @ upstream)


def bank_of_random_masks(outputs: int, tasks: int, seed: int) -> tuple[torch.nn.Module, MaskBank]:
    """LeNet 300-100 (s = ``outputs``) and a bank of ``tasks`` independent random masks (density ½)."""
    model = frozen_random_model("lenet_300_100", outputs, seed=0, device="cpu")
    bank = MaskBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(tasks):
        bank.append({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()})
    return model, bank


@pytest.fixture(scope="module")
def random_bank():
    return bank_of_random_masks(20, 5, seed=0)


def test_uniform_counts_are_cached_per_bank_version():
    model, bank = bank_of_random_masks(10, sp.dense_max_tasks(torch.device("cpu")) + 2, seed=0)
    g = torch.Generator().manual_seed(1)
    new_masks = lambda: {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in maskable_parameters(model).items()}  # noqa: E731
    name, numel = "1.weight", bank.numels["1.weight"]
    first = uniform_counts(bank, name, len(bank))
    assert uniform_counts(bank, name, len(bank)) is first  # a hit: no second count
    assert torch.equal(first, mask_counts(bank.packed(name), numel))
    version = bank.version
    bank.append(new_masks())
    assert bank.version == version + 1
    grown = uniform_counts(bank, name, len(bank))
    assert torch.equal(grown, unpack_bits(bank.packed(name), numel, torch.int32).sum(0))
    assert torch.equal(uniform_counts(bank, name, len(bank) - 1), first)  # the prefix of the grown bank


def test_uniform_prefix_alphas_use_the_cached_count_with_the_reference_gradient():
    """α = 1/T on a 30-task bank (> DENSE_MAX_TASKS): the cached-count forward and the kernel backward."""
    model, bank = bank_of_random_masks(10, 30, seed=3)
    g = torch.Generator().manual_seed(4)
    assert len(bank) > sp.dense_max_tasks(torch.device("cpu")) and sp.uniform_prefix(torch.full((30,), 1 / 30)) == 30
    for alphas in (torch.full((30,), 1 / 30), torch.cat([torch.full((26,), 0.5), torch.zeros(4)])):
        ours_a, ref_a = alphas.clone().requires_grad_(True), alphas.clone().requires_grad_(True)
        ours = superposed_weights(model, bank, ours_a)
        params = maskable_parameters(model)
        loss_ours = loss_ref = 0
        for name, weight in params.items():
            upstream = torch.randn(weight.shape, generator=g)
            ref = weight * superposed_mask_reference(bank.packed(name), bank.numels[name], ref_a).view_as(weight)
            torch.testing.assert_close(ours[name], ref)
            loss_ours = loss_ours + (ours[name] * upstream).sum()
            loss_ref = loss_ref + (ref * upstream).sum()
        loss_ours.backward()
        loss_ref.backward()
        torch.testing.assert_close(ours_a.grad, ref_a.grad, rtol=1e-4, atol=1e-4)


def test_superposed_weights_equal_w_times_reference(random_bank):
    model, bank = random_bank
    alphas = torch.tensor([0.1, 0.0, 0.5, 0.2, 0.2])
    weights = superposed_weights(model, bank, alphas)
    for name, weight in maskable_parameters(model).items():
        ref = superposed_mask_reference(bank.packed(name), bank.numels[name], alphas).view_as(weight)
        torch.testing.assert_close(weights[name], weight * ref)


def test_bad_inputs_raise_clear_errors(random_bank):
    model, bank = random_bank
    with pytest.raises(ValueError, match="shape \\(5,\\)"):
        superposed_weights(model, bank, torch.ones(4))
    with pytest.raises(ValueError, match="floating"):
        superposed_weights(model, bank, torch.ones(5, dtype=torch.long))
    empty = MaskBank.for_model(model)
    with pytest.raises(ValueError, match="empty mask bank"):
        superposed_weights(model, empty, torch.ones(0))
    with pytest.raises(ValueError, match="expected 2"):
        superposed_mask(torch.zeros(3, 5, dtype=torch.uint8), 9, torch.ones(3))
    with pytest.raises(TypeError, match="uint8"):
        superposed_mask(torch.zeros(3, 2), 9, torch.ones(3))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 target is an x86 CPU")
def test_numba_kernels_compiled_for_an_avx2_cpu(tmp_path):
    """The masked adds are vector IR that LLVM lowers to mask registers on AVX-512 and to compare-and-blend
    elsewhere: compiled for an AVX2 CPU (Haswell, no AVX-512; a fresh process and cache), both kernels still
    equal the plain sums on a bank with row groups, a partial group and tail bytes, in float32 and float64."""
    script = """
import torch
from supsup_lite.core.bits import pack_bits, unpack_bits
from supsup_lite.core.superpose import mask_counts, masks_dot
g = torch.Generator().manual_seed(0)
numel = 8 * 2100 + 5
packed = pack_bits(torch.rand(21, numel, generator=g) < 0.5)
masks = unpack_bits(packed, numel, torch.float64)
assert torch.equal(mask_counts(packed, numel), masks.sum(0).int())
vector = torch.randn(numel, generator=g, dtype=torch.float64)
torch.testing.assert_close(masks_dot(packed, numel, vector), masks @ vector)
torch.testing.assert_close(masks_dot(packed, numel, vector.float()).double(), masks @ vector.float().double(),
                           rtol=1e-5, atol=1e-4)
print("ok")
"""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cpu_kernels_keep_the_torch_thread_count():
    """numba's OpenMP layer runs on torch's libgomp and resets its thread count when it starts: a user's
    torch.set_num_threads(1) must survive the first and later kernel calls, and the kernels then use 1 thread."""
    script = """
import torch
from supsup_lite.core.superpose import masks_dot
torch.set_num_threads(1)
packed = torch.randint(0, 256, (20, 4000), dtype=torch.uint8)
for _ in range(2):
    masks_dot(packed, 32000, torch.randn(32000))
import numba
print(torch.get_num_threads(), numba.get_num_threads())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.split() == ["1", "1"], (done.stdout, done.stderr[-2000:])


def test_dot_products_ignore_padding_bits_and_both_kernels_reject_mismatched_sizes():
    numel = 8 * 700 + 3
    packed = random_packed(40, numel, seed=4)
    reference = unpack_bits(packed, numel, torch.float64)
    packed[:, -1] |= 0b11111000  # set the five padding bits after the last weight
    vector = torch.randn(numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(masks_dot(packed, numel, vector), reference @ vector)
    with pytest.raises(ValueError, match=r"floating tensor of shape \(5603,\), one entry per weight; got "
                                         r"torch.float64 \(5602,\)"):
        masks_dot(packed, numel, vector[:-1])
    with pytest.raises(ValueError, match=r"floating tensor .* got torch.int64 \(5603,\)"):
        masks_dot(packed, numel, torch.ones(numel, dtype=torch.int64))
    for wrong in (masks_dot, mask_counts):  # a bank of another layer's size
        with pytest.raises(ValueError, match=r"701 bytes per mask cannot hold exactly 5700 bits \(expected 713\)"):
            wrong(packed, 5700, *([vector] if wrong is masks_dot else []))
