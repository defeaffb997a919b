"""Load-or-train: a cached result comes back bit for bit, every setting changes the key, damage is retrained."""
import pytest
import torch

from supsup_lite.core.masks import MaskBank
from supsup_lite.notebook import cache


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path)
    monkeypatch.setenv("SUPSUP_SCALE", "tutorial")
    monkeypatch.delenv(cache.RETRAIN, raising=False)
    return tmp_path


def _counting_trainer(value):
    calls = []

    def train():
        calls.append(1)
        return value
    return train, calls


def _bank():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3, bias=False))
    bank = MaskBank.for_model(model)
    bank.append({"0.weight": torch.rand(3, 5) > 0.5})
    return bank


def test_second_call_loads_the_same_bank_bit_for_bit(in_tmp, capsys):
    bank = _bank()
    train, calls = _counting_trainer(bank)
    first = cache.load_or_train("bank", settings={"tasks": 1}, train=train)
    second = cache.load_or_train("bank", settings={"tasks": 1}, train=train)
    assert len(calls) == 1 and first is bank
    assert torch.equal(second.packed("0.weight"), bank.packed("0.weight")) and second.network == bank.network
    assert "loaded from runs/cache/bank-" in capsys.readouterr().out
    assert len(list(in_tmp.glob("bank-*.pt"))) == 1


def test_changed_settings_or_source_train_again(in_tmp, monkeypatch):
    train, calls = _counting_trainer({"x": torch.arange(3)})
    cache.load_or_train("t", settings={"batches": 10}, train=train)
    cache.load_or_train("t", settings={"batches": 11}, train=train)
    monkeypatch.setattr(cache, "source_fingerprint", lambda: "edited-kernel")
    cache.load_or_train("t", settings={"batches": 10}, train=train)
    assert len(calls) == 3 and len(list(in_tmp.glob("t-*.pt"))) == 3


def test_smoke_scale_always_trains_and_writes_nothing(in_tmp, monkeypatch):
    monkeypatch.setenv("SUPSUP_SCALE", "smoke")
    train, calls = _counting_trainer([1, 2])
    cache.load_or_train("s", settings={}, train=train)
    cache.load_or_train("s", settings={}, train=train)
    assert len(calls) == 2 and not list(in_tmp.iterdir())


def test_retrain_flag_trains_and_overwrites(in_tmp, monkeypatch):
    cache.load_or_train("r", settings={}, train=lambda: torch.zeros(2))
    monkeypatch.setenv(cache.RETRAIN, "1")
    assert torch.equal(cache.load_or_train("r", settings={}, train=lambda: torch.ones(2)), torch.ones(2))
    monkeypatch.delenv(cache.RETRAIN)
    assert torch.equal(cache.load_or_train("r", settings={}, train=lambda: torch.full((2,), 7.0)), torch.ones(2))


def test_damaged_file_is_reported_and_retrained(in_tmp, capsys):
    cache.load_or_train("d", settings={}, train=lambda: torch.arange(100))
    (path,) = in_tmp.glob("d-*.pt")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    value = cache.load_or_train("d", settings={}, train=lambda: torch.arange(100) * 2)
    assert torch.equal(value, torch.arange(100) * 2)
    assert "fails the CRC32 check" in capsys.readouterr().out


def test_bad_arguments_name_themselves(in_tmp):
    with pytest.raises(ValueError, match="name='a/b' must be a non-empty file-name stem"):
        cache.load_or_train("a/b", settings={}, train=lambda: 1)
    with pytest.raises(TypeError, match="settings of 'x' must be JSON values"):
        cache.load_or_train("x", settings={"model": object()}, train=lambda: 1)
