"""experiments/study.py and report.py: the lr grid, the choice of the best lr and the range
within 10% of it, steps to a target, best-vs-best comparisons by Welch's t-test with Holm's
correction (no verdict from one seed), the budget, and tiny studies end to end (a real divergence
carried into the report; a diverged full run reported as a failure; the lr chosen on the validation
half of the held-out data and a sweep seed the final runs do not use; table, curves and figures
written; a rerun skipping finished runs and continuing an interrupted one; two invocations on one
results dir at once; one-line errors)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import feature_nets
import runs
import train
from data import LatentDataset
from experiments import report as study_report
from experiments import runner, study
from experiments.evaluate import summarise
from tests.test_ablate import write_colours

STUDY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "study.py")
TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8",
        "--eval-samples", "8", "--sample-steps", "2", "--samples-per-class", "3"]


@pytest.fixture(autouse=True)
def tiny_setup(monkeypatch, tmp_path):
    """One thread, no Inception weights, classifiers trained a few steps (their quality is not under test)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv(feature_nets.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(feature_nets, "CLASSIFIER_MIN_STEPS", 5)
    monkeypatch.setattr(feature_nets, "CLASSIFIER_EPOCHS", 1)
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
    arm = dict(default_lr=1e-2, centre=1e-2, lrs=[0.00316, 0.01, 0.0316])
    assert study.edge_lr(opts, arm, 0.01) is None  # inside: nothing to extend
    assert study.edge_lr(opts, arm, 0.0316) == 0.1 and study.edge_lr(opts, arm, 0.00316) == 0.001
    arm["lrs"] = [0.00316, 0.01, 0.0316, 0.1, 0.316]
    assert study.edge_lr(opts, arm, 0.316) is None  # two steps past the grid already: --sweep-extend 2
    assert study.edge_lr(opts, arm, 0.00316) == 0.001  # the other end has its own two
    assert study.edge_lr(opts, arm, 0.1) is None  # 0.316 beyond it was worse (or diverged): stop
    assert study.edge_lr(opts, arm, None) is None  # every run diverged
    opts.sweep_extend = 0
    assert study.edge_lr(opts, dict(default_lr=1e-2, centre=1e-2, lrs=[0.00316, 0.01, 0.0316]), 0.0316) is None


def test_lr_range_is_the_contiguous_run_within_10_percent_of_the_best():
    # best 5.0 at lr 2: 5.4 (lr 3) is within 10%, 5.6 (lr 4) is not, nor is 10 (lr 1); 5.2 at lr 5
    # lies beyond lr 4, outside the contiguous run
    sweep = [sweep_point(1, 10), sweep_point(2, 5.0), sweep_point(3, 5.4), sweep_point(4, 5.6), sweep_point(5, 5.2)]
    assert study_report.lr_range(sweep, 2) == (2, 3)
    sweep[3] = sweep_point(4, 5.5)
    assert study_report.lr_range(sweep, 2) == (2, 5)
    sweep[2] = sweep_point(3, status="diverged")  # a diverged point ends the run
    assert study_report.lr_range(sweep, 2) == (2, 2)


def test_steps_to_target():
    assert study_report.steps_to([(100, 9.0), (200, 5.0), (300, 4.0)], 5.0) == 200
    assert study_report.steps_to([(100, 9.0), (200, 6.0)], 5.0) is None


def test_welch_matches_the_hand_computed_t_df_and_p():
    # a = 1 2 3, b = 4 5 6: means 2 and 5, s^2 = 1 each, v = 1/3 each: t = -3 / sqrt(2/3),
    # df = (2/3)^2 / (2 (1/3)^2 / 2) = 4; for 4 degrees of freedom the two-sided p is closed form,
    # 1 - x (3 - x^2) / 2 with x = |t| / sqrt(t^2 + 4)
    test = study_report.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    t = -3 / math.sqrt(2 / 3)
    x = abs(t) / math.sqrt(t * t + 4)
    assert test["t"] == pytest.approx(t, rel=1e-12) and test["df"] == pytest.approx(4, rel=1e-12)
    assert test["p"] == pytest.approx(1 - x * (3 - x * x) / 2, rel=1e-9)  # 0.0213
    # unequal variances and sizes: b = 2 4 6 8 has mean 5, s^2 = 20/3, v = 5/3; t = -3 / sqrt(1/3 + 5/3),
    # df = 2^2 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 216/53, not the pooled test's 5
    test = study_report.welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert test["t"] == pytest.approx(-3 / math.sqrt(2), rel=1e-12) and test["df"] == pytest.approx(216 / 53)
    assert study_report.welch([1.0], [2.0, 3.0]) is None  # one value: no spread, no test
    assert study_report.welch([1.0, 1.0], [2.0, 2.0]) is None  # no spread at all: undefined, not reported


def test_holm_adjusts_by_rank_and_keeps_the_order():
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1: 0.04, 0.09, 0.08 -> 0.09 (never below an earlier one), 0.5
    assert study_report.holm([0.03, 0.01, 0.04, 0.5]) == pytest.approx([0.09, 0.04, 0.09, 0.5])
    assert study_report.holm([0.6, 0.7]) == [1.0, 1.0]


def arm_row(values, diverged=()):
    """An arm_summary row as compare and findings read it: finished seeds first, then the diverged."""
    seeds = list(range(len(values) + len(diverged)))
    return dict(best_lr=1e-3, final=summarise(values), seeds=seeds, diverged=list(diverged))


def test_compare_tests_each_arm_and_gives_no_verdict_from_one_seed():
    rows = {"vanilla": arm_row([10.0, 10.5, 9.5]), "mp": arm_row([8.0, 8.5, 7.5]), "wn": arm_row([9.5, 10.5, 8.5]),
            "one": arm_row([30.0], diverged=[1, 2]), "none": arm_row([], diverged=[0])}
    del rows["none"]["final"]  # what arm_summary writes when no seed finished
    gaps = study_report.compare(rows, dict.fromkeys(["mp", "wn", "one", "none"], "vanilla"))
    # mp: gap -2 with v = 1/12 a side: t = -2 / sqrt(1/6), df 4, the closed-form p as above (0.008);
    # Holm over the 2 arms tested (mp, wn) doubles the smaller p
    mp, t = gaps["mp"], -2 / math.sqrt(1 / 6)
    x = abs(t) / math.sqrt(t * t + 4)
    assert mp["gap"] == pytest.approx(-2.0) and mp["relative"] == pytest.approx(-0.2)
    assert mp["test"]["t"] == pytest.approx(t) and mp["test"]["p"] == pytest.approx(1 - x * (3 - x * x) / 2)
    assert mp["p_holm"] == pytest.approx(2 * mp["test"]["p"]) and mp["significant"]
    assert gaps["wn"]["p_holm"] == gaps["wn"]["test"]["p"] > 0.3 and not gaps["wn"]["significant"]
    # one seed left (the others diverged): a gap, no spread, no test, no verdict
    one = gaps["one"]
    assert one["n"] == (1, 3) and one["of"] == (3, 3) and one["test"] is None and one["significant"] is None
    assert gaps["none"]["gap"] is None and gaps["none"]["test"] is None
    text = "\n".join(study_report.findings(dict(metric="fd", gaps=gaps, refused={},
                                                 rows={arm: dict(r, sweep=[]) for arm, r in rows.items()})))
    assert "one vs vanilla, each at its best lr: fd 200.0% higher (worse) (gap +20, finished seeds 1/3 vs 3/3); " \
           "no verdict: fewer than 2 finished seeds on a side." in text
    assert (f"mp vs vanilla, each at its best lr: fd 20.0% lower (better) (gap -2, finished seeds 3/3 vs 3/3); "
            f"Welch's t-test t = -4.9, df = 4, p = {mp['test']['p']:.3g}, Holm-adjusted over 2 comparisons "
            f"{mp['p_holm']:.3g}: significant at 0.05.") in text
    assert "wn vs vanilla" in text and "not significant at 0.05: the two are not distinguished" in text
    assert "one: the full runs of seeds [1, 2] (of [0, 1, 2]) diverged: a failure of the arm" in text
    assert "none vs vanilla, each at its best lr: no comparison (finished seeds 0/1 vs 3/3)." in text
    # the case of the old rule: one seed each, 30.0 against 29.9, read as exceeding a spread of 0
    gaps = study_report.compare({"vanilla": arm_row([30.0]), "mp": arm_row([29.9])}, {"mp": "vanilla"})
    assert gaps["mp"]["test"] is None and gaps["mp"]["significant"] is None
    assert summarise([30.0])["std"] is None  # one value has no spread, not a spread of 0


def test_guided_scales_add_comparisons_on_their_fd_and_holm_counts_them_all():
    rows = {"vanilla": arm_row([10.0, 10.5, 9.5]), "mp": arm_row([8.0, 8.5, 7.5])}
    rows["vanilla"]["cfg4"] = dict(fd=summarise([5.0, 6.0]))
    rows["mp"]["cfg4"] = dict(fd=summarise([5.0, 6.0]))  # no gap: p = 1 at cfg 4
    gaps = study_report.compare(rows, {"mp": "vanilla"}, ["4"])
    assert list(gaps) == ["mp", "mp at cfg 4"]
    in_run, guided = gaps["mp"], gaps["mp at cfg 4"]
    assert (guided["arm"], guided["scale"], guided["baseline"], guided["gap"]) == ("mp", "4", "vanilla", 0.0)
    assert guided["test"]["p"] == pytest.approx(1.0) and guided["p_holm"] == pytest.approx(1.0)
    # Holm over both comparisons: the smaller p (the in-run metric's, as in the test above) doubles
    assert in_run["p_holm"] == pytest.approx(2 * in_run["test"]["p"]) and in_run["significant"]
    text = "\n".join(study_report.findings(dict(metric="fd", gaps=gaps, refused={},
                                                 rows={arm: dict(r, sweep=[]) for arm, r in rows.items()})))
    assert "mp vs vanilla, each at its best lr: FD at cfg 4 0.0% " in text
    assert "Holm-adjusted over 2 comparisons" in text


def test_each_arm_is_compared_with_the_vanilla_arm_of_its_objective(tmp_path):
    arms = ["vanilla", "mp", "vanilla-flow", "mp-flow"]
    assert {arm: runner.baseline_of(arm, arms) for arm in arms} == {
        "vanilla": None, "mp": "vanilla", "vanilla-flow": "vanilla", "mp-flow": "vanilla-flow"}
    assert runner.baseline_of("mp-flow", ["vanilla", "mp-flow"]) == "vanilla"  # no vanilla flow arm to hold fixed
    assert runner.baseline_of("mp-flow", ["mp-flow"]) is None
    rows = {"vanilla": arm_row([10.0, 11.0]), "vanilla-flow": arm_row([8.0, 9.0]), "mp-flow": arm_row([4.0, 5.0])}
    gaps = study_report.compare(rows, {arm: runner.baseline_of(arm, rows) for arm in rows})
    assert (gaps["vanilla-flow"]["baseline"], gaps["vanilla-flow"]["gap"]) == ("vanilla", -2.0)
    assert (gaps["mp-flow"]["baseline"], gaps["mp-flow"]["gap"]) == ("vanilla-flow", -4.0)


def test_flow_arms_train_the_flow_objective_and_sweep_around_a_given_centre(tmp_path, data):
    opts = study.parse(data + ["--results-dir", str(tmp_path / "r"), "--arms", "vanilla", "mp-flow",
                               "--sweep-points", "3", "--sweep-span", "10", "--sweep-around", "mp-flow=0.0316"])
    plan, refused = study.make_plan(opts, study.study_data(opts))
    assert not refused and plan["vanilla"]["lrs"] == [3.16e-5, 1e-4, 3.16e-4]  # train.py's default, 1e-4
    assert plan["mp-flow"] == dict(default_lr=1e-2, centre=0.0316, lrs=[0.00999, 0.0316, 0.0999])
    for bad in (["--sweep-around", "mp=0.1"], ["--sweep-around", "vanilla=0"], ["--sweep-around", "vanilla"]):
        with pytest.raises(study.UsageError, match="--sweep-around"):
            study.parse(data + ["--arms", "vanilla", "mp-flow"] + bad)


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
    # a guided scale samples the final scoring again with two forwards per step: 3x the unguided scoring
    guided, _ = study.estimate(study.parse(["--parallel", "2", "--results-dir", str(tmp_path), "--cfg-scales", "1", "4"]),
                               *runs)
    profile = study.PROFILES["cpu"]
    unguided_scoring = 10 * opts.samples_per_class * opts.sample_steps * profile["sample_forward_s"]
    assert guided - seconds == pytest.approx(runs[1] * 2 * unguided_scoring / 2)


def test_default_final_seeds_are_not_the_sweep_seed(tmp_path):
    opts = study.parse(["--results-dir", str(tmp_path)])
    assert opts.sweep_seed not in opts.seeds and len(opts.seeds) >= 3


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    for argv in (["--arms", "nope"], ["--sweep-points", "0"], ["--seeds", "1", "1"], ["--sweep-span", "0.5"],
                 ["--sweep-extend", "-1"], ["--sweep-span", "inf"], ["--sweep-span", "1e400"], ["--sweep-span", "nan"],
                 ["--sweep-span", "1e300", "--sweep-points", "2"],  # finite, but its extension overflows
                 ["--sweep-seed", "-1"], ["--seeds", "-1"], ["--seeds", str(2 ** 32)],
                 ["--cfg-scales", "-1"], ["--cfg-scales", "inf"], ["--cfg-scales", "4", "4"],
                 ["--seeds", "0", "1"],  # the sweep seed (0) among the final seeds
                 ["--data-path", str(tmp_path / "missing")], ["--metric", "fid"],
                 ["--data-path", write_colours(tmp_path / "no-heldout", 8, seed=0)], ["--readme", str(tmp_path)],
                 ["--readme", write_colours(tmp_path / "d", 8, seed=0) + "/manifest.json"]):
        assert study.main(argv + ["--results-dir", str(tmp_path / "r"), "--estimate"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("study.py: error:"), err
    # refused before its results dir is made (or locked)
    assert study.main(["--data-path", str(tmp_path / "missing"), "--results-dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_a_diverged_sweep_run_is_recorded_and_reported_not_chosen(tmp_path, data, monkeypatch):
    # vanilla's default lr is 1e-4; a span of 1e68 puts the sweep at 1e-38 and 1e30: at 1e30 the
    # first Adam step moves every weight by about 1e30 and the next loss is not finite
    out = tmp_path / "study"
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "--sweep-points", "2", "--sweep-extend", "0",
                          "--sweep-span", "1e68", "--sweep-steps", "2", "--steps", "2", "--eval-every", "2",
                          "--seeds", "1"]
    assert study.main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    row = summary["rows"]["vanilla"]
    statuses = {p["lr"]: p["status"] for p in row["sweep"]}
    assert statuses == {1e-38: "ok", 1e30: "diverged"}
    assert row["best_lr"] == 1e-38 and row["seeds_ok"] == [1]
    diverged = next(p for p in row["sweep"] if p["status"] == "diverged")
    assert "non-finite" in diverged["message"]
    report = (out / "study.md").read_text()
    assert "1e+30: diverged" in report and "the sweep diverged at lr 1e+30" in report
    assert (out / "study_sweep.png").is_file()


def test_a_diverged_full_run_is_a_failure_of_its_arm_and_one_seed_left_gives_no_verdict(tmp_path, data, monkeypatch):
    # a real divergence of a full run needs an lr the sweep did not reject; it is simulated here by
    # reporting seed 2 of mp as train_run reports a non-finite loss (the real path: the test above)
    real_train_run = runner.train_run

    def train_run(argv):
        run_dir, diverged = real_train_run(argv)
        simulated = "/full/mp-" in argv[argv.index("--results-dir") + 1] and argv[argv.index("--seed") + 1] == "2"
        return run_dir, "loss is non-finite at step 2 (simulated)" if simulated else diverged
    monkeypatch.setattr(runner, "train_run", train_run)
    out = tmp_path / "study"
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "mp", "--sweep-points", "1",
                          "--sweep-steps", "2", "--steps", "2", "--eval-every", "2", "--seeds", "1", "2"]
    assert study.main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    row = summary["rows"]["mp"]
    assert row["seeds"] == [1, 2] and row["seeds_ok"] == [1] and row["diverged"] == [2] and row["final"]["n"] == 1
    assert row["final"]["std"] is None
    gap = summary["gaps"]["mp"]
    assert gap["n"] == [1, 2] and gap["of"] == [2, 2] and gap["test"] is None and gap["significant"] is None
    report = (out / "study.md").read_text()
    table_row = next(line for line in report.splitlines() if line.startswith("| mp |"))
    assert table_row.endswith("| 1/2, diverged: [2] |"), table_row
    assert "(gap " in report and "finished seeds 1/2 vs 2/2); no verdict: fewer than 2 finished seeds on a side." \
        in report
    assert "mp: the full runs of seeds [2] (of [1, 2]) diverged: a failure of the arm at its best lr" in report


def test_tiny_study_writes_table_curves_and_figures_and_a_rerun_skips_finished_runs(tmp_path, data, monkeypatch):
    out = tmp_path / "study"
    readme = tmp_path / "README.md"
    readme.write_text(f"# before\n{study_report.README_START}\nold\n{study_report.README_END}\nafter\n")
    # MaP-DiT under flow matching against vanilla DDPM: both objectives through the whole study
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "mp-flow", "--sweep-points", "2",
                          "--sweep-extend", "0", "--sweep-span", "10", "--sweep-steps", "2", "--steps", "4", "--eval-every", "2",
                          "--seeds", "1", "2", "--visuals", str(tmp_path / "visuals"), "--readme", str(readme),
                          "--cfg-scales", "1", "2"]
    calls = count_training(monkeypatch)
    assert study.main(argv) == 0
    assert len(calls) == 2 * 2 + 2 * 2  # 2 arms x 2 lrs, then 2 arms x 2 seeds
    assert {(a.objective, a.prediction) for a in calls} == {("ddpm", "v"), ("flow", "velocity")}
    summary = json.loads((out / "study.json").read_text())
    for arm, default in (("vanilla", 1e-4), ("mp-flow", 1e-2)):
        row = summary["rows"][arm]
        sweep = {}
        for lr in study.sweep_lrs(default, 2, 10):  # the sweep runs' own records pick the best
            root = runner.job_root(study.parse(argv), "sweep", arm, lr, 0)
            run = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "config.json"))]
            sweep[lr] = json.loads(open(os.path.join(root, run[0], "results.json")).read())["final"]
        assert row["best_lr"] == min(sweep, key=sweep.get)
        assert row["seeds_ok"] == [1, 2] and row["default_lr"] == default
        assert all([s for s, _ in curve] == [2, 4] for curve in row["curves"].values())
        assert math.isfinite(row["final"]["mean"]) and row["final"]["n"] == 2
        assert row["parameters"] > 0 and row["step_time_s"]["n"] == 2
    report = (out / "study.md").read_text()
    for needle in ("| vanilla |", "| mp-flow |", "lr within 10% of best", "steps to fd_classifier",
                   "mp-flow vs vanilla",
                   "flow arms (mp-flow) flow matching (velocity)", "(DDIM-2 / Euler-2)",
                   "by Welch's t-test (two-sided)", "Holm's correction", "of 12 samples at cfg 1 from fixed noise",
                   "against the validation half", "against the test half",
                   "(visuals/study_curves.png)",  # relative to the --readme file, which links them
                   "and on the FD of the final samples at cfg 2",
                   "classifier-free guidance (all channels) at cfg 2", "mp-flow vs vanilla, each at its best lr: FD at cfg 2",
                   "(visuals/study_samples_cfg2.png)"):
        assert needle in report, needle
    assert readme.read_text() == (f"# before\n{study_report.README_START}\n{report}\n{study_report.README_END}"
                                  "\nafter\n")
    for name in ("study_curves.png", "study_sweep.png", "study_samples.png", "study_magnitudes.png",
                 "study_samples_cfg2.png"):
        assert (out / name).is_file() and (tmp_path / "visuals" / name).is_file(), name

    # the sweep runs evaluate against one half of the held-out images, the full runs (curves, final
    # metric, the final scoring's reference) against the other: the two halves partition it
    references = {phase: {json.loads((p.parent / "config.json").read_text())["eval_reference"]
                          for p in out.glob(f"{phase}/*/*/results.json")} for phase in ("sweep", "full")}
    (validation,), (test,) = references["sweep"], references["full"]
    assert (summary["settings"]["validation"], summary["settings"]["test"]) == (validation, test)
    assert torch.load(out / "eval-cache" / "reference.pt", weights_only=True)["key"]["heldout"].startswith(test)
    assert len(list((out / "eval-cache").glob("classifier-*.pt"))) == 1  # the in-run and final scores share it

    def images(path):
        ds = LatentDataset(path)
        return sorted(ds[i][0].numpy().tobytes() for i in range(len(ds)))
    assert len(images(validation)) == len(images(test)) == 24
    assert sorted(images(validation) + images(test)) == images(data[3])

    # a rerun skips every finished run: no training, results untouched
    results = sorted(str(p) for p in out.glob("*/*/*/results.json"))
    assert len(results) == 8
    mtimes = {p: os.path.getmtime(p) for p in results}
    calls.clear()
    assert study.main(argv) == 0
    assert calls == [] and mtimes == {p: os.path.getmtime(p) for p in results}

    # an interrupted full run (last checkpoint, finished mark and results missing) continues in its own run directory
    victim = os.path.dirname(next(p for p in results if "/full/mp-" in p))
    for name in ("checkpoints/0000004.pt", "results.json", "finished"):  # what a killed run has not written
        os.remove(os.path.join(victim, name))
    assert study.main(argv) == 0
    assert len(calls) == 1 and runs.run_dir_of(calls[0]) == victim
    assert "resumed at step 3" in open(os.path.join(victim, "log.txt")).read()
    result = json.loads(open(os.path.join(victim, "results.json")).read())
    assert result["status"] == "ok"
    assert [s for s, _ in result["curve"]] == [2, 4]  # step 4 evaluated again after the resume: once in the curve


def test_two_invocations_on_one_results_dir_take_turns_and_the_second_finds_the_work_done(tmp_path, data):
    # two real study.py processes (the classifiers at their real budgets: a few seconds here), each
    # running its runs as --parallel subprocesses, which work under their parent's lock
    out = tmp_path / "study"
    argv = data + TINY + ["--results-dir", str(out), "--arms", "vanilla", "--sweep-points", "1", "--sweep-steps", "2",
                          "--steps", "2", "--eval-every", "2", "--seeds", "1", "2", "--threads", "1", "--parallel", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "hub"))
    env.pop(feature_nets.INCEPTION_ENV, None)
    logs = [tmp_path / f"stderr-{i}.txt" for i in range(2)]
    with runs.folder_lock(str(out), create=True):  # both start while the folder is held: they meet at its lock
        procs = []
        for log in logs:
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, STUDY, *argv], env=env, stdout=subprocess.DEVNULL,
                                              stderr=f))
        for proc, log in zip(procs, logs):  # until each waits for the lock (or, without one, has ended)
            while "waiting for another process" not in log.read_text():
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
    codes = [proc.wait(timeout=600) for proc in procs]
    errs = [log.read_text() for log in logs]
    assert codes == [0, 0] and not any("Traceback" in e for e in errs), errs
    # one invocation ran the three runs; the other found them finished and ran nothing
    assert sorted(e.count("[study] started ") for e in errs) == [0, 3], errs
    run_dirs = [d for d in out.glob("*/vanilla-*/*") if (d / "config.json").is_file()]
    assert len(run_dirs) == 3  # one run directory per run: no run was started twice
    assert all("waiting for another process" in e for e in errs)
    summary = json.loads((out / "study.json").read_text())
    finals = {r["seed"]: r["final"] for r in (json.loads(p.read_text()) for p in out.glob("full/*/*/results.json"))}
    assert summary["rows"]["vanilla"]["final"]["values"] == [finals[1], finals[2]]
    assert json.loads((out / "wall.json").read_text())["invocations"] == 1
