"""experiments/study.py and study_report.py: the lr grid, the choice of the best lr and the range
within 10% of it, steps to a target, best-vs-best gaps against the spread, the budget, and tiny
studies end to end (a real divergence carried into the report; table, curves and figures written;
a rerun skipping finished runs and continuing an interrupted one; one-line errors)."""
import json
import math
import os

import pytest
import torch

import feature_nets
import train
import watch
from experiments import evaluate, study, study_report
from tests.test_ablate import write_colours

TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8",
        "--eval-samples", "8", "--sample-steps", "2", "--samples-per-class", "3"]


@pytest.fixture(autouse=True)
def tiny_setup(monkeypatch, tmp_path):
    """One thread, no Inception weights, classifiers trained a few steps (their quality is not under test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv(feature_nets.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(watch, "CLASSIFIER_STEPS", 5)
    monkeypatch.setattr(evaluate, "CLASSIFIER_MIN_STEPS", 5)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path):
    return ["--data-path", write_colours(tmp_path / "data", 96, seed=0),
            "--eval-data-path", write_colours(tmp_path / "held", 48, seed=1)]


def count_training(monkeypatch):
    calls, real_main = [], train.main
    monkeypatch.setattr(train, "main", lambda args: calls.append(args) or real_main(args))
    return calls


def sweep_point(lr, final=None, status="ok"):
    return dict(lr=lr, status=status, final=final)


def test_sweep_lrs_are_log_spaced_around_the_default_and_span_the_asked_ratio():
    lrs = study.sweep_lrs(1e-2, 5, 100)
    assert lrs == [1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1]
    assert lrs[-1] / lrs[0] == pytest.approx(100) and lrs[2] == 1e-2
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) / min(ratios) < 1.01  # equal steps in log lr (up to the 3-digit rounding)


def test_best_lr_is_the_lowest_metric_of_the_runs_that_finished():
    sweep = [sweep_point(1e-3, 4.0), sweep_point(3e-3, 2.5), sweep_point(1e-2, 3.0),
             dict(sweep_point(3e-2, status="diverged"), message="non-finite"), sweep_point(1e-1, status="missing")]
    assert study.best_lr(sweep) == 3e-3
    sweep[1]["final"] = float("nan")  # a NaN metric is not a best
    assert study.best_lr(sweep) == 1e-2
    assert study.best_lr([dict(sweep_point(1e-3, status="diverged"))]) is None


def test_a_best_lr_at_an_edge_extends_the_sweep_one_half_decade_at_a_time(tmp_path):
    opts = study.parse(["--results-dir", str(tmp_path), "--sweep-points", "3", "--sweep-span", "10",
                        "--sweep-extend", "2"])
    arm = dict(default_lr=1e-2, lrs=[0.00316, 0.01, 0.0316])
    assert study.edge_lr(opts, arm, 0.01) is None  # inside: nothing to extend
    assert study.edge_lr(opts, arm, 0.0316) == 0.1 and study.edge_lr(opts, arm, 0.00316) == 0.001
    arm["lrs"] = [0.00316, 0.01, 0.0316, 0.1, 0.316]
    assert study.edge_lr(opts, arm, 0.316) is None  # two steps past the grid already: --sweep-extend 2
    assert study.edge_lr(opts, arm, 0.00316) == 0.001  # the other end has its own two
    assert study.edge_lr(opts, arm, 0.1) is None  # 0.316 beyond it was worse (or diverged): stop
    assert study.edge_lr(opts, arm, None) is None  # every run diverged
    opts.sweep_extend = 0
    assert study.edge_lr(opts, dict(default_lr=1e-2, lrs=[0.00316, 0.01, 0.0316]), 0.0316) is None


def test_lr_range_is_the_contiguous_run_within_10_percent_of_the_best():
    # best 5.0 at lr 2: 5.4 (lr 3) is within 10%, 5.6 (lr 4) is not, nor is 10 (lr 1); 5.2 at lr 5
    # lies beyond lr 4, outside the contiguous run
    sweep = [sweep_point(1, 10), sweep_point(2, 5.0), sweep_point(3, 5.4), sweep_point(4, 5.6), sweep_point(5, 5.2)]
    assert study_report.lr_range(sweep, 2) == (2, 3)
    sweep[3] = sweep_point(4, 5.5)
    assert study_report.lr_range(sweep, 2) == (2, 5)
    sweep[2] = sweep_point(3, status="diverged")  # a diverged point ends the run
    assert study_report.lr_range(sweep, 2) == (2, 2)


def test_steps_to_target_and_gap_against_spread():
    assert study_report.steps_to([(100, 9.0), (200, 5.0), (300, 4.0)], 5.0) == 200
    assert study_report.steps_to([(100, 9.0), (200, 6.0)], 5.0) is None
    rows = {"vanilla": dict(final=dict(mean=10.0, std=1.0, n=3)), "mp": dict(final=dict(mean=8.5, std=0.4, n=3)),
            "wn": dict(final=dict(mean=9.0, std=0.2, n=3))}
    gaps = study_report.compare(rows, "vanilla")
    assert gaps["mp"]["gap"] == pytest.approx(-1.5) and gaps["mp"]["relative"] == pytest.approx(-0.15)
    assert gaps["mp"]["spread"] == pytest.approx(1.4) and gaps["mp"]["exceeds"]  # 1.5 > 1.0 + 0.4
    assert not gaps["wn"]["exceeds"]  # 1.0 < 1.0 + 0.2: the intervals overlap


def test_default_study_fits_the_cpu_budget_and_other_models_are_unknown(tmp_path):
    opts = study.parse(["--parallel", "2", "--results-dir", str(tmp_path)])
    runs = len(study.ARMS) * opts.sweep_points, len(study.ARMS) * len(opts.seeds)
    seconds, words = study.estimate(opts, *runs)
    assert seconds <= 2.5 * 3600, words
    assert opts.sweep_points >= 5 and opts.sweep_span >= 30 and len(opts.seeds) >= 3
    serial, _ = study.estimate(study.parse(["--results-dir", str(tmp_path)]), *runs)
    classifier = study.PROFILES["cpu"]["classifier_s"]
    assert serial - classifier == pytest.approx(2 * (seconds - classifier))
    assert study.estimate(study.parse(["--depth", "8", "--results-dir", str(tmp_path)]), *runs)[0] is None


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    for argv in (["--arms", "nope"], ["--sweep-points", "0"], ["--seeds", "1", "1"], ["--sweep-span", "0.5"], ["--sweep-extend", "-1"],
                 ["--data-path", str(tmp_path / "missing")], ["--metric", "fid"],
                 ["--data-path", write_colours(tmp_path / "no-heldout", 8, seed=0)], ["--readme", str(tmp_path)],
                 ["--readme", write_colours(tmp_path / "d", 8, seed=0) + "/manifest.json"]):
        assert study.main(argv + ["--results-dir", str(tmp_path / "r"), "--estimate"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("study.py: error:"), err


def test_a_diverged_sweep_run_is_recorded_and_reported_not_chosen(tmp_path, data, monkeypatch):
    # vanilla's default lr is 1e-4; a span of 1e68 puts the sweep at 1e-38 and 1e30: at 1e30 the
    # first Adam step moves every weight by about 1e30 and the next loss is not finite
    out = tmp_path / "study"
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "--sweep-points", "2", "--sweep-extend", "0",
                          "--sweep-span", "1e68", "--sweep-steps", "2", "--steps", "2", "--eval-every", "2",
                          "--seeds", "0"]
    assert study.main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    row = summary["rows"]["vanilla"]
    statuses = {p["lr"]: p["status"] for p in row["sweep"]}
    assert statuses == {1e-38: "ok", 1e30: "diverged"}
    assert row["best_lr"] == 1e-38 and row["seeds_ok"] == [0]
    diverged = next(p for p in row["sweep"] if p["status"] == "diverged")
    assert "non-finite" in diverged["message"]
    report = (out / "study.md").read_text()
    assert "1e+30: diverged" in report and "the sweep diverged at lr 1e+30" in report
    assert (out / "study_sweep.png").is_file()


def test_tiny_study_writes_table_curves_and_figures_and_a_rerun_skips_finished_runs(tmp_path, data, monkeypatch):
    out = tmp_path / "study"
    readme = tmp_path / "README.md"
    readme.write_text(f"# before\n{study_report.README_START}\nold\n{study_report.README_END}\nafter\n")
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "mp", "--sweep-points", "2",
                          "--sweep-extend", "0", "--sweep-span", "10", "--sweep-steps", "2", "--steps", "4", "--eval-every", "2",
                          "--seeds", "0", "1", "--visuals", str(tmp_path / "visuals"), "--readme", str(readme)]
    calls = count_training(monkeypatch)
    assert study.main(argv) == 0
    assert len(calls) == 2 * 2 + 2 * 2  # 2 arms x 2 lrs, then 2 arms x 2 seeds
    summary = json.loads((out / "study.json").read_text())
    for arm, default in (("vanilla", 1e-4), ("mp", 1e-2)):
        row = summary["rows"][arm]
        sweep = {}
        for lr in study.sweep_lrs(default, 2, 10):  # the sweep runs' own records pick the best
            root = study.job_root(study.parse(argv), "sweep", arm, lr, 0)
            run = [d for d in os.listdir(root) if d[:3].isdigit()]
            sweep[lr] = json.loads(open(os.path.join(root, run[0], "results.json")).read())["final"]
        assert row["best_lr"] == min(sweep, key=sweep.get)
        assert row["seeds_ok"] == [0, 1] and row["default_lr"] == default
        assert all([s for s, _ in curve] == [2, 4] for curve in row["curves"].values())
        assert math.isfinite(row["final"]["mean"]) and row["final"]["n"] == 2
        assert row["parameters"] > 0 and row["step_time_s"]["n"] == 2
    report = (out / "study.md").read_text()
    for needle in ("| vanilla |", "| mp |", "lr within 10% of best", "steps to fd_classifier", "mp vs vanilla",
                   "the seed spread", "of 12 samples from fixed noise",
                   f"({os.path.relpath(tmp_path / 'visuals' / 'study_curves.png')})"):
        assert needle in report, needle
    assert readme.read_text() == (f"# before\n{study_report.README_START}\n{report}\n{study_report.README_END}"
                                  "\nafter\n")
    for name in ("study_curves.png", "study_sweep.png", "study_samples.png", "study_magnitudes.png"):
        assert (out / name).is_file() and (tmp_path / "visuals" / name).is_file(), name

    # a rerun skips every finished run: no training, results untouched
    results = sorted(str(p) for p in out.glob("*/*/*/results.json"))
    assert len(results) == 8
    mtimes = {p: os.path.getmtime(p) for p in results}
    calls.clear()
    assert study.main(argv) == 0
    assert calls == [] and mtimes == {p: os.path.getmtime(p) for p in results}

    # an interrupted full run (last checkpoint and results missing) continues in its own run directory
    victim = os.path.dirname(next(p for p in results if "/full/mp-" in p))
    os.remove(os.path.join(victim, "checkpoints", "0000004.pt"))
    os.remove(os.path.join(victim, "results.json"))
    assert study.main(argv) == 0
    assert len(calls) == 1 and calls[0].resume == victim
    result = json.loads(open(os.path.join(victim, "results.json")).read())
    assert result["status"] == "ok"
    assert [s for s, _ in result["curve"]] == [2, 4]  # step 4 evaluated again after the resume: once in the curve
