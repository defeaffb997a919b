"""The GNu run script: checkpoints over the masks learned so far, resume bit for bit, JSON fields, objective G."""
import json

import pytest
import torch

from supsup_lite.scenarios import experiments
from supsup_lite.scenarios.experiments import GNuConfig, GNuRun, gnu_permuted_mnist, paper_eval_ckpts
from supsup_lite.core.inference import entropy, superfluous_logsumexp
from supsup_lite.core.masks import MaskBank
from supsup_lite.scenarios.protocols import gg_accuracy, gnu_accuracy, shuffled_test_set

TINY = dict(tasks=4, model="lenet_300_100", outputs=25, batches=5, save_every=2, checkpoints=(2, 4))
RECORD_FIELDS = {"tasks", "objective", "gnu_accuracy", "task_inference_accuracy", "gg_accuracy", "eval_seconds",
                 "train_seconds", "wall_seconds", "cpu_seconds", "bank_bytes", "peak_rss_mb", "per_task_gnu_accuracy",
                 "per_task_inference_accuracy"}


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds") and k != "peak_rss_mb"} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, gnu_permuted_mnist(GNuConfig(**TINY), out, progress=False)


def test_paper_checkpoints():
    assert paper_eval_ckpts(250) == (10, 50, 100, 150, 200, 250)
    assert paper_eval_ckpts(2500) == (10, 500, 1000, 1500, 2000, 2500)
    assert GNuConfig(tasks=30, checkpoints=(5, 10)).checkpoints == (5, 10, 30)  # the end is always evaluated


def test_results_json_has_every_field(uninterrupted):
    out, results = uninterrupted
    assert json.loads((out / "results.json").read_text()) == results
    assert results["complete"] and results["tasks_trained"] == 4
    assert {"config", "hardware", "train_seconds", "eval_seconds", "wall_seconds", "cpu_seconds",
            "gg_per_task"} <= set(results)
    assert {"device", "cpu", "torch_threads", "torch"} <= set(results["hardware"])
    assert sorted((r["objective"], r["tasks"]) for r in results["checkpoints"]) == [("G", 2), ("G", 4),
                                                                                   ("H", 2), ("H", 4)]
    bank = MaskBank.load(out / "bank.pt")
    for record in results["checkpoints"]:
        assert set(record) == RECORD_FIELDS
        assert len(record["per_task_gnu_accuracy"]) == record["tasks"]
        assert record["bank_bytes"] == record["tasks"] * bank.bytes_per_task
        assert 0.0 <= record["gnu_accuracy"] <= record["gg_accuracy"] <= 1.0
        assert record["train_seconds"] > 0 and record["peak_rss_mb"] > 0


def test_a_checkpoint_is_the_gnu_protocol_on_the_masks_learned_so_far(uninterrupted):
    """The record at T = 2 (bank already holding 4 masks) equals the protocol on a bank of only the first 2."""
    out, results = uninterrupted
    run = GNuRun(GNuConfig(**TINY), out, progress=False)
    first_two = MaskBank.for_model(run.model)
    for task in range(2):
        first_two.append(run.bank.get(task, torch.bool))
    for objective, fn in (("H", entropy), ("G", superfluous_logsumexp)):
        expected = gnu_accuracy(run.model, first_two, run.stream, objective=fn, seed=0)
        record = run.result(2, objective)
        assert record["per_task_gnu_accuracy"] == pytest.approx(expected.per_task, abs=1e-5)
        assert record["task_inference_accuracy"] == pytest.approx(expected.task_accuracy, abs=1e-6)
    for task in range(2):
        first = experiments.first_test_images(run.stream, task, 128, 0)
        assert torch.equal(first, shuffled_test_set(run.stream, task, 0)[0][::128])
    gg = gg_accuracy(run.model, run.bank, run.stream)
    assert results["gg_per_task"] == pytest.approx(gg, abs=1e-6)
    assert run.result(4, "H")["gg_accuracy"] == pytest.approx(sum(gg) / 4, abs=1e-6)


def test_resume_after_an_interruption_gives_the_same_bank_bit_for_bit(uninterrupted, tmp_path, monkeypatch):
    reference_out, reference = uninterrupted
    calls = []
    real_train_bank = experiments.train_bank

    def interrupted_on_second_chunk(*args, **kwargs):
        calls.append(len(kwargs["bank"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_bank(*args, **kwargs)

    monkeypatch.setattr(experiments, "train_bank", interrupted_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        gnu_permuted_mnist(GNuConfig(**TINY), tmp_path, progress=False)
    assert len(MaskBank.load(tmp_path / "bank.pt")) == 2

    calls.clear()
    counted = lambda *args, **kwargs: calls.append(len(kwargs["bank"])) or real_train_bank(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(experiments, "train_bank", counted)
    resumed = gnu_permuted_mnist(GNuConfig(**TINY), tmp_path, progress=False)
    assert calls == [2]  # only tasks 2-3 were trained again
    ours, theirs = MaskBank.load(tmp_path / "bank.pt"), MaskBank.load(reference_out / "bank.pt")
    assert len(ours) == len(theirs) == 4
    assert all(torch.equal(ours.packed(n), theirs.packed(n)) for n in theirs.names)
    assert without_timings(resumed["checkpoints"]) == without_timings(reference["checkpoints"])


def test_a_finished_run_is_not_redone_and_settings_must_match(uninterrupted, monkeypatch):
    out, results = uninterrupted
    monkeypatch.setattr(experiments, "train_bank", lambda *a, **k: pytest.fail("retrained a finished run"))
    again = gnu_permuted_mnist(GNuConfig(**TINY), out, progress=False)
    assert without_timings(again["checkpoints"]) == without_timings(results["checkpoints"])
    with pytest.raises(ValueError, match="batches"):
        gnu_permuted_mnist(GNuConfig(**{**TINY, "batches": 9}), out, progress=False)


@pytest.mark.parametrize("settings, message", [
    (dict(outputs=10, objectives=("G",)), "superfluous"),
    (dict(model="resnet"), "unknown model"),
    (dict(tasks=5, checkpoints=(0, 5)), "checkpoints"),
    (dict(objectives=("entropy",)), "objectives"),
])
def test_bad_settings_fail_early(settings, message):
    with pytest.raises(ValueError, match=message):
        GNuConfig(**settings)


def test_cli_writes_the_json(tmp_path, capsys):
    code = experiments.main(["gnu_permuted_mnist", "--tasks", "1", "--batches", "2", "--outputs", "12",
                             "--objective", "G", "--model", "lenet", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["model"] == "lenet_300_100" and saved["config"]["objectives"] == ["G"]
    assert json.loads(capsys.readouterr().out)["complete"]
    assert experiments.main(["gnu_permuted_mnist", "--outputs", "10", "--objective", "G"]) == 2


def test_command_line_round_trips_through_the_parser():
    config = GNuConfig(tasks=30, model="fc1024", outputs=500, objectives=("G",), batches=200, checkpoints=(5, 10))
    words = experiments.command_line(config, "runs/x").split()
    assert words[:4] == ["python", "-m", "supsup_lite", "gnu_permuted_mnist"]
    args = experiments.parse_args(words[3:])
    assert GNuConfig(**{k: v for k, v in vars(args).items() if k in GNuConfig.__dataclass_fields__}) == config
    assert str(args.out) == "runs/x"


def test_g_gradient_is_softmax_on_superfluous_outputs_and_zero_on_real_classes():
    """∂G/∂z_j = softmax_j(z) over all s outputs for j ≥ ℓ, 0 for the ℓ real classes; H's gradient differs."""
    z = torch.randn(5, 30, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(superfluous_logsumexp(z, real_neurons=10).sum(), z)
    softmax = torch.softmax(z.detach(), 1)
    torch.testing.assert_close(grad[:, 10:], softmax[:, 10:])
    assert torch.equal(grad[:, :10], torch.zeros_like(grad[:, :10]))
    torch.testing.assert_close(superfluous_logsumexp(z).detach(), torch.logsumexp(z.detach(), 1))
    # The cross-entropy gradient on a non-label output is softmax_j as well: G mirrors the training loss there.
    labels = torch.randint(0, 10, (5,))
    (ce_grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, labels, reduction="sum"), z)
    torch.testing.assert_close(ce_grad[:, 10:], grad[:, 10:])
    (h_grad,) = torch.autograd.grad(entropy(z).sum(), z)
    assert not torch.allclose(h_grad[:, 10:], grad[:, 10:])
