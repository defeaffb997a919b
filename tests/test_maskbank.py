"""MaskBank: bit-packed storage, save/load round trips, and clear errors for every kind of bad input."""
import math
import warnings

import pytest
import torch

from supsup_lite.core.bits import packed_size, unpack_bits
from supsup_lite import config
from supsup_lite.core.masks import MaskBank, MaskBankError, NetworkFingerprint
from supsup_lite.core.models import frozen_random_model
from supsup_lite.data import PermutedMNIST, RotatedMNIST, UnsharedLabels

# Odd sizes on purpose: 91 and 5 weights leave padding bits in the last byte.
SHAPES = {"layer.weight": (13, 7), "conv.weight": (4, 3, 3, 3), "head.weight": (5,)}
TOY = NetworkFingerprint(arch="toy", seed=7, shapes=tuple(SHAPES.items()), signs_crc32=0x1234ABCD)


def random_masks(generator: torch.Generator, density: float = 0.5) -> dict[str, torch.Tensor]:
    return {name: torch.rand(shape, generator=generator) < density for name, shape in SHAPES.items()}


def make_bank(num_tasks: int = 3, seed: int = 0, device: str = "cpu") -> tuple[MaskBank, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    bank = MaskBank(TOY, stream={"stream": "toy", "seed": 1}, device=device)
    masks = [random_masks(generator, density) for density in torch.linspace(0.1, 0.9, num_tasks).tolist()]
    for task_masks in masks:
        bank.append(task_masks)
    return bank, masks


def assert_same_bank(a: MaskBank, b: MaskBank) -> None:
    assert (a.network, a.stream, a.num_outputs, len(a)) == (b.network, b.stream, b.num_outputs, len(b))
    assert a.shapes == b.shapes and a.names == b.names
    for name in a.names:
        assert torch.equal(a.packed(name).cpu(), b.packed(name).cpu())


def test_get_returns_the_appended_masks_bit_for_bit(device):
    bank, masks = make_bank(4, device=device)
    assert len(bank) == 4
    for task, task_masks in enumerate(masks):
        got = bank.get(task, dtype=torch.bool)
        assert set(got) == set(SHAPES) and all(g.device.type == device.type for g in got.values())
        for name, mask in task_masks.items():
            assert got[name].shape == mask.shape and torch.equal(got[name].cpu(), mask)
        floats = bank.get(task)  # default float32 {0, 1}, ready for W ⊙ M
        assert all(floats[n].dtype == torch.float32 and torch.equal(floats[n].cpu(), m.float())
                   for n, m in task_masks.items())


def test_append_accepts_zero_one_floats_like_bools():
    bank, masks = make_bank(1)
    bank.append({name: m.float() for name, m in masks[0].items()})
    for name in SHAPES:
        assert torch.equal(bank.packed(name)[0], bank.packed(name)[1])


def test_nbytes_is_exactly_ceil_p_over_8_per_task_per_parameter():
    expected_per_task = sum(math.ceil(math.prod(s) / 8) for s in SHAPES.values())  # 12 + 14 + 1 bytes
    assert expected_per_task == 27
    for num_tasks in (0, 1, 9, 17):  # 9 and 17 cross the growth steps of the storage
        bank, _ = make_bank(num_tasks) if num_tasks else (MaskBank(TOY, device="cpu"), [])
        assert bank.bytes_per_task == expected_per_task
        assert bank.nbytes == num_tasks * expected_per_task
        for name, shape in SHAPES.items():
            packed = bank.packed(name)
            assert packed.dtype == torch.uint8 and tuple(packed.shape) == (num_tasks, packed_size(math.prod(shape)))


def test_lenet_bank_holds_one_bit_per_weight():
    model = frozen_random_model("lenet_300_100", 100, seed=0, device="cpu")
    bank = MaskBank.for_model(model)
    assert (bank.arch, bank.base_seed, bank.num_outputs) == ("lenet_300_100", 0, 100)  # read off the model
    bank.append({name: torch.ones(p.shape, dtype=torch.bool) for name, p in model.named_parameters()})
    assert bank.nbytes == 275_200 // 8  # 784·300 + 300·100 + 100·100 = 275,200 mask bits per task (s = 100)


def test_padding_bits_stay_zero():
    bank = MaskBank(NetworkFingerprint("toy", 0, (("w", (5,)),), 0), device="cpu")
    bank.append({"w": torch.ones(5, dtype=torch.bool)})
    assert bank.packed("w").tolist() == [[0b00011111]]


def test_save_load_round_trip_bit_for_bit(tmp_path, device):
    bank, masks = make_bank(5, device=device)
    path = bank.save(tmp_path / "sub" / "bank.pt")
    loaded = MaskBank.load(path, device=device)
    assert_same_bank(bank, loaded)
    for task, task_masks in enumerate(masks):
        assert all(torch.equal(loaded.get(task, torch.bool)[n].cpu(), m) for n, m in task_masks.items())
    assert loaded.version == bank.version == 5
    loaded.append(masks[0])  # a loaded bank keeps growing
    assert len(loaded) == 6 and loaded.version == 6
    assert torch.equal(loaded.packed("conv.weight")[5], bank.packed("conv.weight")[0])
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically through a temporary file


def test_save_load_round_trip_of_an_empty_bank(tmp_path):
    bank = MaskBank(TOY, device="cpu")
    assert_same_bank(bank, MaskBank.load(bank.save(tmp_path / "empty.pt"), device="cpu"))


def test_file_size_is_the_packed_bits_plus_a_constant(tmp_path):
    sizes = {}
    for num_tasks in (1, 40):
        bank, _ = make_bank(num_tasks)
        sizes[num_tasks] = bank.save(tmp_path / f"{num_tasks}.pt").stat().st_size - bank.nbytes
    # torch's zip container aligns each stored tensor to 64 bytes: the overhead may move by < 64 per parameter
    assert abs(sizes[40] - sizes[1]) < 64 * len(SHAPES)


def test_bank_refuses_any_other_base_network():
    lenet = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    bank = MaskBank.for_model(lenet)
    bank.check_compatible(frozen_random_model("lenet_300_100", 10, seed=0, device="cpu"))  # rebuilt: the same net
    others = (frozen_random_model("lenet_300_100", 10, seed=3, device="cpu"),   # same shapes, other signs
              frozen_random_model("fc_1024_1024", 10, device="cpu"),
              frozen_random_model("lenet_300_100", 100, device="cpu"))           # a different head size
    for other in others:
        pattern = r"trained on lenet_300_100 \(seed 0, signs crc32 [0-9a-f]{8}"
        with pytest.raises(MaskBankError, match=pattern) as err:
            bank.check_compatible(other)
        assert NetworkFingerprint.of(other).describe() in str(err.value)  # both fingerprints are named


def test_fingerprint_follows_the_weights_not_the_label():
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    before = NetworkFingerprint.of(model)
    assert NetworkFingerprint.of(model) is before  # cached while the weights are unchanged
    with torch.no_grad():
        model[1].weight[0, 0].neg_()  # one sign flipped in place
    assert NetworkFingerprint.of(model).signs_crc32 != before.signs_crc32
    assert NetworkFingerprint.from_dict(before.to_dict()) == before


def test_loaded_bank_checks_the_base_network(tmp_path):
    lenet = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    loaded = MaskBank.load(MaskBank.for_model(lenet).save(tmp_path / "lenet.pt"), device="cpu")
    loaded.check_compatible(lenet)
    with pytest.raises(MaskBankError, match="but the model is fc_1024_1024"):
        loaded.check_compatible(frozen_random_model("fc_1024_1024", 10, device="cpu"))


def test_bank_refuses_a_stream_with_other_tasks():
    model = frozen_random_model("lenet_300_100", 10, seed=0, device="cpu")
    bank = MaskBank.for_model(model, stream=PermutedMNIST(3, seed=1, device="cpu"))
    bank.check_stream(PermutedMNIST(250, seed=1, device="cpu"))  # more tasks of the same stream: fine
    for other in (PermutedMNIST(3, seed=2, device="cpu"), RotatedMNIST(3, device="cpu"),
                  UnsharedLabels(PermutedMNIST(3, seed=1, device="cpu"))):
        with pytest.raises(MaskBankError, match=r"trained on the task stream \{'stream': 'PermutedMNIST', 'seed': 1\}"):
            bank.check_stream(other)
    MaskBank.for_model(model).check_stream(RotatedMNIST(3, device="cpu"))  # no stream recorded: nothing to check


def test_bank_follows_a_model_to_another_device(device):
    bank, masks = make_bank(3)
    moved = bank.to(device)
    assert moved.device.type == device.type and (moved is bank) == (device.type == "cpu")
    assert_same_bank(bank, moved)
    assert bank.to("cpu") is bank


def test_load_places_the_bank_on_the_default_device(tmp_path, monkeypatch):
    bank, _ = make_bank(2)
    path = bank.save(tmp_path / "bank.pt")
    monkeypatch.delenv("SUPSUP_DEVICE", raising=False)
    assert MaskBank.load(path).device == config.device()
    monkeypatch.setenv("SUPSUP_DEVICE", "cpu")
    assert MaskBank.load(path).device == torch.device("cpu")


@pytest.mark.parametrize("bad", [
    {"layer.weight": torch.zeros(13, 7, dtype=torch.bool)},                                  # a parameter missing
    {**{n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}, "extra": torch.zeros(2)},  # one too many
    {**{n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}, "head.weight": torch.zeros(6)},  # shape
    {**{n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}, "head.weight": torch.full((5,), 0.5)},
])
def test_append_refuses_masks_that_do_not_fit(bad):
    bank, _ = make_bank(2)
    before = {n: bank.packed(n).clone() for n in bank.names}
    with pytest.raises(MaskBankError):
        bank.append(bad)
    assert len(bank) == 2 and all(torch.equal(bank.packed(n), before[n]) for n in bank.names)  # nothing half-added


@pytest.mark.parametrize("task", [-1, 3, 100])
def test_missing_task_is_a_clear_error(task):
    bank, _ = make_bank(3)
    with pytest.raises(IndexError, match=r"not in the bank: it holds tasks 0\.\.2"):
        bank.get(task)


def test_missing_task_in_an_empty_bank():
    with pytest.raises(IndexError, match="the bank is empty"):
        MaskBank(TOY, device="cpu").get(0)


def test_missing_file_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mask bank"):
        MaskBank.load(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MaskBankError, match="not a supsup-lite mask bank"):
        MaskBank.load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(MaskBankError, match="not a readable mask bank"):
        MaskBank.load(tmp_path / "text.pt")


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(tmp_path, keep):
    bank, _ = make_bank(3)
    data = bank.save(tmp_path / "bank.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:int(keep * len(data))])
    with pytest.raises(MaskBankError):
        MaskBank.load(tmp_path / "cut.pt")


def test_corrupted_mask_byte_is_caught_by_the_checksum(tmp_path):
    bank, _ = make_bank(3)
    data = bytearray(bank.save(tmp_path / "bank.pt").read_bytes())
    stored = bank.packed("conv.weight").numpy().tobytes()  # torch stores tensor bytes uncompressed
    start = data.find(stored)
    assert start > 0 and data.find(stored, start + 1) == -1
    for offset in (0, len(stored) // 2, len(stored) - 1):
        damaged = bytearray(data)
        damaged[start + offset] ^= 0x04
        (tmp_path / "bad.pt").write_bytes(damaged)
        with pytest.raises(MaskBankError, match="checksum mismatch for 'conv.weight'"):
            MaskBank.load(tmp_path / "bad.pt")


def test_tampered_state_is_refused(tmp_path):
    bank, _ = make_bank(2)
    state = torch.load(bank.save(tmp_path / "bank.pt"), weights_only=True)
    cases = {
        "version": {**state, "version": 99},
        "crc": {**state, "packed": {**state["packed"], "head.weight": state["packed"]["head.weight"] ^ 1}},
        "shape": {**state, "packed": {**state["packed"], "layer.weight": state["packed"]["layer.weight"][:1]}},
        "dtype": {**state, "packed": {**state["packed"], "head.weight": state["packed"]["head.weight"].int()}},
    }
    messages = {"version": "format version 99", "crc": "checksum mismatch", "shape": "expected", "dtype": "uint8"}
    for case, bad_state in cases.items():
        torch.save(bad_state, tmp_path / f"{case}.pt")
        with pytest.raises(MaskBankError, match=messages[case]):
            MaskBank.load(tmp_path / f"{case}.pt")


def _metadata_span(data: bytes) -> range:
    """Byte range of the pickled metadata (network and stream fingerprints, counts) inside a saved bank."""
    start, end = data.find(b"format"), data.find(b"crc32")
    assert 0 < start < end
    return range(start, end)


def test_any_flipped_metadata_bit_is_refused_or_harmless(tmp_path):
    bank, _ = make_bank(2)
    data = bank.save(tmp_path / "bank.pt").read_bytes()
    path = tmp_path / "flipped.pt"
    for i in _metadata_span(data):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        path.write_bytes(damaged)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = MaskBank.load(path)
        except MaskBankError:
            continue
        assert_same_bank(bank, loaded)  # a flip the format does not read (e.g. a pickle memo index)


def test_load_onto_a_device_and_unpack_there(tmp_path):
    bank, masks = make_bank(2)
    loaded = MaskBank.load(bank.save(tmp_path / "bank.pt"), device="cpu")
    assert loaded.device == torch.device("cpu")
    packed = loaded.packed("layer.weight")
    assert torch.equal(unpack_bits(packed, 91).view(2, 13, 7), torch.stack([m["layer.weight"] for m in masks]))


def test_replace_overwrites_one_task_and_bumps_the_version(device):
    bank, masks = make_bank(3, device=device)
    version = bank.version
    bank.replace(1, masks[2])
    assert bank.version == version + 1 and len(bank) == 3
    for name in SHAPES:
        assert torch.equal(bank.packed(name)[1], bank.packed(name)[2])
        assert torch.equal(bank.get(0, torch.bool)[name].cpu(), masks[0][name])
    with pytest.raises(IndexError, match="not in the bank"):
        bank.replace(3, masks[0])
    with pytest.raises(MaskBankError, match="not binary"):
        bank.replace(0, {**masks[0], "head.weight": torch.full((5,), 0.5)})
