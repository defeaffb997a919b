"""The experiment CLI: presets, checkpoints over the masks learned so far, sampled evaluation with intervals, resume
after a kill (GNu and NNs), the JSON and CSV written to results/, objective G."""
import csv
import json

import pytest
import torch

from supsup_lite.scenarios import experiments
from supsup_lite.core.inference import alpha_gradient, entropy, one_shot, superfluous_logsumexp
from supsup_lite.core.masks import MaskBank, apply_masks
from supsup_lite.core.training import predict
from supsup_lite.scenarios.allocation import EPSILON, nns_accuracy
from supsup_lite.scenarios.experiments import (PRESETS, GNuConfig, GNuRun, NNsConfig, NNsRun, Preset,
                                               bootstrap_interval, gnu_interval, gnu_permuted_mnist,
                                               nns_permuted_mnist, objective_disagreements, paper_eval_ckpts,
                                               sampled_tasks, wilson_interval)
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
    assert experiments.load_results(out) == results
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
        assert record["task_inference_accuracy"] == pytest.approx(expected.inference_accuracy, abs=1e-6)
    for task in range(2):
        first = experiments.first_test_images(run.stream, task, 128, 0)
        assert torch.equal(first, shuffled_test_set(run.stream, task, 0)[0][::128])
    gg = gg_accuracy(run.model, run.bank, run.stream)
    assert results["gg_per_task"] == pytest.approx(gg, abs=1e-6)
    assert run.result(4, "H")["gg_accuracy"] == pytest.approx(sum(gg) / 4, abs=1e-6)



def test_objective_disagreements_are_the_first_images_one_objective_alone_gets_right(uninterrupted):
    """Against a plain reference: One-Shot (one backward per image) on the first image of every shuffled test batch."""
    out, results = uninterrupted
    run = GNuRun(GNuConfig(**TINY), out, progress=False)
    rows = objective_disagreements(run.model, run.bank, run.stream, tasks=[0, 1, 2, 3], num_tasks=4)
    expected, fns = [], {"H": entropy, "G": superfluous_logsumexp}
    for task in range(4):
        firsts = shuffled_test_set(run.stream, task, 0)[0][::128]
        for batch, image in enumerate(firsts):
            picks = {o: one_shot(run.model, run.bank, image[None], objective=fn) for o, fn in fns.items()}
            if (picks["H"] == task) != (picks["G"] == task):
                expected.append({"task": task, "batch": batch, **picks})
    assert rows == expected and rows  # the 5-batch masks disagree on some images
    record = run.result(4, "H")  # the picks are the checkpoint's: H's misses per task match its record
    for task in range(4):
        picks = experiments.first_image_picks(run.model, run.bank, run.stream, tasks=[task], objective="H",
                                              num_tasks=4)
        recorded = record["per_task_inference_accuracy"][task]
        assert (picks == task).double().mean().item() == pytest.approx(recorded, abs=1e-5)
    row = rows[0]
    image = shuffled_test_set(run.stream, row["task"], 0)[0][128 * row["batch"]][None]
    for objective, fn in fns.items():
        grad = experiments.first_image_gradient(run.model, run.bank, run.stream, task=row["task"],
                                                batch=row["batch"], objective=objective)
        assert torch.allclose(grad, alpha_gradient(run.model, run.bank, image, objective=fn)[1], atol=1e-6,
                              rtol=1e-4)
        assert int(grad.argmin()) == row[objective]
    with pytest.raises(ValueError, match="two different objectives"):
        objective_disagreements(run.model, run.bank, run.stream, tasks=[0], objectives=("H", "H"))
    with pytest.raises(ValueError, match=r"tasks\[i\] must be ≤ 1, got 2"):
        objective_disagreements(run.model, run.bank, run.stream, tasks=[2], num_tasks=2)
    with pytest.raises(ValueError, match="batch must be ≤ 78, got 79"):
        experiments.first_image_gradient(run.model, run.bank, run.stream, task=0, batch=79, objective="H")


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


# --- presets ---------------------------------------------------------------------------------------------------
def test_presets_have_the_authors_settings():
    lenet, fc, big, laptop, nns = (PRESETS[n].config for n in ("lenet-250", "fc-250", "lenet-2500",
                                                               "lenet-2500-laptop", "nns-2500-laptop"))
    recipe = dict(batches=1000, batch_size=128, lr=1e-4, objectives=("H", "G"), tasks=250,
                  checkpoints=(10, 50, 100, 150, 200, 250), sample_tasks=None, sample_batches=None)
    for config, model, outputs in ((lenet, "lenet_300_100", 100), (fc, "fc_1024_1024", 500)):
        assert {k: getattr(config, k) for k in recipe} == recipe
        assert (config.model, config.outputs) == (model, outputs)
    for config in (big, laptop, nns):
        assert (config.tasks, config.model, config.outputs) == (2500, "lenet_300_100", 500)
        assert config.checkpoints == (10, 500, 1000, 1500, 2000, 2500)
    assert big.batches == 1000 and big.sample_tasks is None and big.objectives == ("H", "G")
    assert laptop.objectives == ("H", "G")
    for name in ("lenet-2500-laptop", "nns-2500-laptop"):  # the laptop budget says what it cuts
        config = PRESETS[name].config
        assert config.batches < 1000 and config.sample_tasks and config.sample_batches
        assert f"{config.batches} batches per task" in PRESETS[name].differs
    assert (nns.budget, nns.epsilon, nns.check_every, nns.min_slots) == (2500, EPSILON, 100, 5)
    assert EPSILON == 2.0 ** -3


def test_cli_lists_the_presets_and_rejects_an_unknown_one(capsys):
    assert experiments.main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)
    assert experiments.main(["preset", "lenet-9", "--no-progress"]) == 2
    assert "unknown preset 'lenet-9'" in capsys.readouterr().err


# --- sampled evaluation ----------------------------------------------------------------------------------------
def test_task_samples_are_seeded_uniform_and_nested():
    assert sampled_tasks(50, 8, 10, seed=0) == list(range(8))          # fewer learned than the sample: all
    assert sampled_tasks(50, 30, None, seed=0) == list(range(30))
    first, again = sampled_tasks(2500, 500, 100, seed=3), sampled_tasks(2500, 500, 100, seed=3)
    assert first == again and len(set(first)) == 100 and all(0 <= t < 500 for t in first)
    assert first != sampled_tasks(2500, 500, 100, seed=4)
    later = sampled_tasks(2500, 1000, 100, seed=3)
    assert set(later) & set(first) == {t for t in later if t < 500}   # nested: one permutation for all checkpoints
    # uniform: over many seeds every task of 0..9 is drawn about equally often (3 of 10 each time)
    counts = torch.zeros(10)
    for seed in range(600):
        counts[sampled_tasks(40, 10, 3, seed=seed)] += 1
    assert counts.sum() == 1800 and counts.min() > 130 and counts.max() < 230


def test_wilson_interval_matches_the_formula_and_known_values():
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.27753, abs=1e-5)
    low, high = wilson_interval(81, 100)
    assert (low, high) == pytest.approx((0.72221, 0.87485), abs=1e-5)
    assert wilson_interval(40, 40)[1] == 1.0 and wilson_interval(0, 40)[0] == 0.0  # never outside [0, 1]
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = torch.rand(40, 6, generator=torch.Generator().manual_seed(1))
    for resample in ("tasks", "batches"):
        low, high = bootstrap_interval(values, resample=resample, seed=7)
        assert (low, high) == bootstrap_interval(values, resample=resample, seed=7)
        assert low < values.mean().item() < high
    # resampling batches within tasks ignores the spread between tasks, resampling tasks does not
    spread = values + torch.arange(40.0)[:, None]
    narrow, wide = (bootstrap_interval(spread, resample=r, seed=0) for r in ("batches", "tasks"))
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert bootstrap_interval(torch.full((5, 3), 0.5), resample="tasks", seed=0) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="resample"):
        bootstrap_interval(values, resample="images", seed=0)


SAMPLED = dict(tasks=6, model="lenet_300_100", outputs=25, batches=30, save_every=3, checkpoints=(3, 6),
               sample_tasks=4, sample_batches=20)


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("sampled")
    return out, gnu_permuted_mnist(GNuConfig(**SAMPLED), out, progress=False)


def test_sampled_checkpoint_is_the_gnu_protocol_on_the_sample_and_its_interval_holds_the_full_value(sampled_run):
    out, results = sampled_run
    run = GNuRun(GNuConfig(**SAMPLED), out, progress=False)
    record = run.result(6, "H")
    evaluated, k = record["evaluated_tasks"], SAMPLED["sample_batches"]
    assert evaluated == sampled_tasks(6, 6, 4, seed=0) and record["sample"]["images_per_task"] == k * 128
    plain = []  # the paper's loop on the first k batches of each sampled task's shuffled test set
    for task in evaluated:
        x, y = shuffled_test_set(run.stream, task, 0)
        correct = 0
        for start in range(0, k * 128, 128):
            if one_shot(run.model, run.bank, x[start:start + 1], objective=entropy, num_tasks=6) == task:
                weights = apply_masks(run.model, run.bank.get(task))
                correct += (predict(run.model, weights, x[start:start + 128]) == y[start:start + 128]).sum().item()
        plain.append(correct / (k * 128))
    assert record["per_task_gnu_accuracy"] == pytest.approx(plain, abs=1e-5)
    assert record["gnu_accuracy"] == pytest.approx(sum(plain) / 4, abs=1e-6)
    full = gnu_accuracy(run.model, run.bank, run.stream, objective=entropy, seed=0)  # every batch of every task
    low, high = record["ci95"]["gnu_accuracy"]
    assert low <= full.accuracy <= high
    low, high = record["ci95"]["task_inference_accuracy"]
    assert low <= full.inference_accuracy <= high
    low, high = record["ci95"]["gg_accuracy"]
    assert low <= sum(full.given) / 6 <= high
    first = run.result(3, "G")  # T = 3 ≤ sample_tasks: every task, a sample of batches
    assert first["sample"]["tasks"] == 3 and "within each task" in first["sample"]["interval"]
    assert sum(v is not None for v in results["gg_per_task"]) == len(set(evaluated) | {0, 1, 2})


# --- resume after a kill: NNs --------------------------------------------------------------------------------
NNS = dict(tasks=4, budget=3, outputs=25, batches=40, check_every=20, checkpoints=(2, 4), save_every=1,
           sample_tasks=3, sample_batches=4)


def learner_state(run: NNsRun) -> tuple:
    learner = run.learner
    return ([{n: s.detach().clone() for n, s in scores.items()} for scores in learner.scores],
            [o.state_dict()["state"] for o in learner.optimizers], [repr(c) for c in learner.log], learner.batches_seen,
            learner.live)  # repr: the first check's score is nan


def assert_same_learner(ours: tuple, theirs: tuple) -> None:
    assert ours[2:] == theirs[2:]
    for a, b in zip(ours[0], theirs[0], strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert all(torch.equal(a[i]["square_avg"], b[i]["square_avg"]) and a[i]["step"] == b[i]["step"] for i in a)


@pytest.fixture(scope="module")
def nns_uninterrupted(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("nns")
    return out, nns_permuted_mnist(NNsConfig(**NNS), out, progress=False)


def test_nns_resume_after_a_kill_gives_the_uninterrupted_run(nns_uninterrupted, tmp_path, monkeypatch):
    reference_out, reference = nns_uninterrupted
    real_learn, calls = experiments.NNsLearner.learn, []

    def killed_in_the_third_task(self, *args, **kwargs):
        calls.append(self.batches_seen)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_learn(self, *args, **kwargs)

    monkeypatch.setattr(experiments.NNsLearner, "learn", killed_in_the_third_task)
    with pytest.raises(KeyboardInterrupt):
        nns_permuted_mnist(NNsConfig(**NNS), tmp_path, progress=False)
    monkeypatch.setattr(experiments.NNsLearner, "learn", real_learn)
    assert json.loads((tmp_path / "results.json").read_text())["tasks_trained"] == 2
    resumed = nns_permuted_mnist(NNsConfig(**NNS), tmp_path, progress=False)
    assert resumed["sessions"] == 2 and reference["sessions"] == 1
    assert without_timings(resumed["checkpoints"]) == without_timings(reference["checkpoints"])
    assert_same_learner(learner_state(NNsRun(NNsConfig(**NNS), tmp_path, progress=False)),
                        learner_state(NNsRun(NNsConfig(**NNS), reference_out, progress=False)))
    assert sorted(p.name for p in (tmp_path / "learner").iterdir()) == \
        sorted(torch.load(tmp_path / "learner.pt", weights_only=True)["slot_files"])  # no stale slot files


def test_nns_checkpoint_is_nns_accuracy_of_that_moments_masks(nns_uninterrupted):
    out, results = nns_uninterrupted
    run = NNsRun(NNsConfig(**NNS), out, progress=False)
    final = run.result(4, "H")
    expected = nns_accuracy(run.model, run.learner.bank(), run.stream, tasks=final["evaluated_tasks"], batches=4)
    assert final["per_task_nns_accuracy"] == pytest.approx(expected.per_task, abs=1e-5)
    assert final["masks"] == 3 and final["skipped_checks"] > 0  # the budget of 3 masks is spent: checks skipped
    assert final["ci95"]["nns_accuracy"][0] <= final["nns_accuracy"] <= final["ci95"]["nns_accuracy"][1]


# --- results/ ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [GNuConfig(**SAMPLED), NNsConfig(**NNS)], ids=["gnu", "nns"])
def test_preset_writes_the_summary_json_and_csv(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", Preset("tiny", config, "a test", "tiny"))
    argv = ["preset", "tiny", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"),
            "--threads", "1", "--no-progress"]
    assert experiments.main(argv) == 0
    summary = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert summary["command"] == "python -m supsup_lite " + " ".join(argv)
    assert summary["preset"] == "tiny" and summary["differs_from_paper"] == "tiny" and summary["complete"]
    assert {"device", "cpu", "torch_threads", "torch"} <= set(summary["hardware"])
    assert summary["hardware"]["torch_threads"] == 1
    assert "git_commit" in summary and summary["wall_seconds"] > 0 and summary["cpu_seconds"] > 0
    main = "gnu_accuracy" if isinstance(config, GNuConfig) else "nns_accuracy"
    for record in summary["checkpoints"]:
        assert {"tasks", main, "sample", "ci95", "eval_seconds", "wall_seconds"} <= set(record)
        assert not any(key.startswith("per_task") for key in record)
        if main == "gnu_accuracy":
            assert {"gg_accuracy", "task_inference_accuracy"} <= set(record)
            assert set(record["ci95"]) == {"gnu_accuracy", "gg_accuracy", "task_inference_accuracy"}
    objectives = {r["objective"] for r in summary["checkpoints"]}
    assert objectives == ({"H", "G"} if main == "gnu_accuracy" else {"H"})
    rows = list(csv.DictReader((tmp_path / "results" / "tiny.csv").open()))
    assert len(rows) == len(summary["checkpoints"])
    prefix = main.split("_")[0]
    assert all(float(r[f"{prefix}_ci95_low"]) <= float(r[main]) <= float(r[f"{prefix}_ci95_high"]) for r in rows)
    assert (tmp_path / "results" / "tiny.json").stat().st_size < 20_000
    capsys.readouterr()


def test_two_stage_bootstrap_sees_the_noise_within_tasks():
    gen = torch.Generator().manual_seed(0)
    table = (torch.rand(8, 10, generator=gen) < 0.5).double()   # noisy batches, tasks alike on average
    two_stage = bootstrap_interval(table, resample="tasks", seed=1)
    tasks_only = bootstrap_interval(table.mean(1, keepdim=True), resample="tasks", seed=1)
    assert two_stage[1] - two_stage[0] > tasks_only[1] - tasks_only[0]


def test_gnu_interval_keeps_failures_the_sample_did_not_see():
    # 80 sampled batches, every task inferred right: the GNu bootstrap equals GG's, but P(right) may be < 1
    bootstrap = gg = (0.79, 0.81)
    inference = wilson_interval(80, 80, z=2.241402727604947)
    low, high = gnu_interval(bootstrap, gg, inference)
    assert low == pytest.approx(0.79 * inference[0]) and low < 0.76 and high == 0.81
