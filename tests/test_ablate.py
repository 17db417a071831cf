"""experiments/ablate.py (with evaluate.py, report.py) and feature_nets' small classifier: the runner's
Frechet distance against the closed form for Gaussian features, class consistency on an easy
dataset, and a tiny grid end to end (table, figures, skipping finished runs, continuing an
interrupted one, one-line errors)."""
import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluation
import feature_nets
import runs as runs_module
import train
from data import ShardWriter
from experiments import ablate, evaluate, runner

PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [230, 220, 40]])  # 4 easy classes


def colour_images(n, size=8, seed=0):
    """Solid-colour images with +-20 per-pixel noise, class = colour; uint8 (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(PALETTE)
    images = PALETTE[labels][:, :, None, None] + rng.integers(-20, 21, (n, 3, size, size))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_colours(path, n, seed):
    images, labels = colour_images(n, seed=seed)
    writer = ShardWriter(path, "pixel", images.shape[1:], len(PALETTE))
    writer.write_shard(0, labels, images=images)
    writer.finish(class_names=["red", "green", "blue", "yellow"])
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread saves the threading overhead, which dominates here and
    grows when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def model_space(images):
    return torch.from_numpy(images).float() / 127.5 - 1


class FeaturesAreInputs(torch.nn.Module):
    """A stand-in classifier whose features are its input, flattened: the runner's path from
    features to a number, with features we choose."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # for the device lookup
        self.config = dict(feature_dim=4)

    def body(self, x):
        return x.flatten(1)

    def forward(self, x):
        return x.flatten(1)


def test_runner_frechet_distance_matches_the_gaussian_closed_form(tmp_path):
    rng = np.random.default_rng(0)
    n = 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([1.0, 1.0, 1.0, 0.5])
    a = mu1 + np.sqrt(var1) * rng.standard_normal((n, 4))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((n, 4))
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(var1) - sqrt(var2))^2 = 1.25 + 1.5 = 2.75 + ...
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    # Sampling error with n = 200k: the mean terms move by about 2 |mu1 - mu2| sqrt((var1 + var2) / n)
    # <= 0.005 per dimension, the variance terms by about 2 |sqrt(v1) - sqrt(v2)| sqrt(v / 2n) <= 0.007;
    # 0.05 is more than 5 standard deviations of the total (and the seed is fixed).
    ctx = SimpleNamespace(kind="latent", classifier=feature_nets.ClassifierNet(FeaturesAreInputs(), "test"),
                          ref_stats=evaluation.feature_stats(b), fd_name="FD-test", fid_note="n/a (test)",
                          fid_reference=None)
    samples = torch.from_numpy(a).float().view(n, 4, 1, 1)
    labels = torch.zeros(n, dtype=torch.long)
    entry = evaluate.score_samples(samples, labels, ctx, str(tmp_path), 1.0)
    assert entry["fd"] == pytest.approx(want, abs=0.05)
    assert entry["fd_network"] == "FD-test" and entry["fid"] is None
    # identical sets score ~0 (float32 features, float64 statistics)
    ctx.ref_stats = evaluation.feature_stats(samples.view(n, 4).double().numpy())
    assert abs(evaluate.score_samples(samples, labels, ctx, str(tmp_path), 1.0)["fd"]) < 1e-6


def test_class_consistency_high_on_real_data_and_chance_with_shuffled_labels():
    train_images, train_labels = colour_images(400, seed=0)
    held_images, held_labels = colour_images(400, seed=1)
    net = feature_nets.train_classifier(model_space(train_images), torch.from_numpy(train_labels), len(PALETTE),
                                        epochs=1, batch_size=32, min_steps=40)
    classifier = feature_nets.ClassifierNet(net, "test")
    held = held_images.transpose(0, 2, 3, 1)  # uint8 images, as the samples are scored
    assert evaluate.consistency(classifier, held, held_labels) > 0.9
    # Shuffled labels: with a (near-)perfect classifier the agreement is the chance that a
    # permuted label equals the true one, sum_k (n_k / N)^2 = 1/4 for 4 balanced classes, with a
    # standard deviation over permutations of about sqrt(p (1 - p) / N) = 0.022 for N = 400;
    # +-0.09 is 4 of those.
    shuffled = np.random.default_rng(2).permutation(held_labels)
    assert abs(evaluate.consistency(classifier, held, shuffled) - 0.25) < 0.09
    # the model-space path of latent runs reads the same; the same images through the classifier score ~0
    assert evaluate.consistency(classifier, model_space(held_images), held_labels) > 0.9
    features = evaluate.features(classifier, held)
    stats = evaluation.feature_stats(features)
    assert abs(evaluation.frechet_distance(*stats, *stats)) < 1e-6


def test_default_grid_lists_every_switch_alone_and_forced_with_weight_norm(capsys):
    assert ablate.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12  # vanilla at two lrs, 8 single switches, all MP, all MP + rotation
    assert lines[0].startswith("vanilla") and "(no flags)" in lines[0]
    assert lines[1].startswith("vanilla-lr1e-3") and "--lr 1e-3" in lines[1]
    forced = [line for line in lines if "--use-forced-weight-normalization" in line]
    assert len(forced) == 1 and "--use-weight-normalization --use-forced-weight-normalization" in forced[0]
    assert any(line.startswith("mp-rotation") and "--modulation rotation-scale" in line for line in lines)


@pytest.mark.parametrize("kind, demo, flag", [("pixel", False, "--hflip"), ("latent", False, "--no-hflip"),
                                              ("pixel", True, "--no-hflip")])
def test_runs_flip_as_train_py_defaults(kind, demo, flag):
    """Each run gets train.py's default: pixel datasets flipped; latent data (a mirrored latent only
    approximates the latent of the mirrored image) and the demo not."""
    data = SimpleNamespace(path="data", demo=demo, manifest={"kind": kind})
    argv = runner.train_argv(ablate.parse([]), data, "runs", "vanilla", None, 0)
    assert flag in argv and ({"--hflip", "--no-hflip"} - {flag}).isdisjoint(argv)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    for argv in (["--grid", "tiny", "--configs", "nope"], ["--num-steps", "0"], ["--seeds", "1", "1"],
                 ["--data-path", str(tmp_path / "missing"), "--results-dir", str(tmp_path / "r")]):
        assert ablate.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ablate.py: error:"), err


def test_tiny_grid_writes_table_and_figures_skips_finished_and_continues_interrupted(tmp_path, monkeypatch):
    monkeypatch.delenv(feature_nets.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights here
    monkeypatch.setattr(feature_nets, "CLASSIFIER_MIN_STEPS", 10)  # its quality is not under test here
    monkeypatch.setattr(feature_nets, "CLASSIFIER_EPOCHS", 1)
    data = write_colours(tmp_path / "data", 96, seed=0)
    held = write_colours(tmp_path / "held", 48, seed=1)
    grid = tmp_path / "grid"
    argv = ["--grid", "tiny", "--data-path", data, "--eval-data-path", held, "--results-dir", str(grid),
            "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--num-steps", "3",
            "--global-batch-size", "8", "--samples-per-class", "3", "--sample-steps", "2",
            "--visuals", str(tmp_path / "visuals"), "--train-args", "--sample-steps 2"]
    calls, real_main = [], train.main
    monkeypatch.setattr(train, "main", lambda args: calls.append(args) or real_main(args))

    assert ablate.main(argv) == 0
    assert len(calls) == 4
    table = (grid / "table.md").read_text()
    for needle in ("| vanilla |", "| mp |", "FD-data-classifier", "FID-Inception", "| n/a |", "real data",
                   "AdamW 0.0001", "Adam (0.9, 0.99) 0.01"):
        assert needle in table, needle
    summary = json.loads((grid / "results.json").read_text())
    runs = [r for row in summary["rows"] for r in row["runs"]]
    assert [(r["arm"], r["seed"], r["status"]) for r in runs] == [
        ("vanilla", 0, "ok"), ("vanilla", 1, "ok"), ("mp", 0, "ok"), ("mp", 1, "ok")]
    for r in runs:
        assert r["weights"] == "ema-0.1" and r["samples"]["1"]["fid"] is None
        with np.load(r["samples"]["1"]["npz"]) as npz:  # the same labels, class-major, in every run
            assert npz["arr_0"].shape == (12, 8, 8, 3)
            assert npz["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for name in ("ablation_samples.png", "ablation_magnitudes.png"):
        assert (grid / name).is_file() and (tmp_path / "visuals" / name).is_file()

    # a rerun skips every finished run: no training, results untouched
    mtimes = {r["run_dir"]: os.path.getmtime(os.path.join(r["run_dir"], "results.json")) for r in runs}
    calls.clear()
    assert ablate.main(argv) == 0
    assert calls == []
    assert mtimes == {d: os.path.getmtime(os.path.join(d, "results.json")) for d in mtimes}

    # an interrupted run (last checkpoint, finished mark and results missing) continues in its own run directory
    victim = runs[3]["run_dir"]
    for name in ("checkpoints/0000003.pt", "results.json", "finished"):  # what a killed run has not written
        os.remove(os.path.join(victim, name))
    assert ablate.main(argv) == 0
    assert len(calls) == 1 and runs_module.run_dir_of(calls[0]) == victim
    assert "resumed at step 2" in open(os.path.join(victim, "log.txt")).read()
    assert os.path.isfile(os.path.join(victim, "checkpoints", "0000003.pt"))
    assert json.loads(open(os.path.join(victim, "results.json")).read())["status"] == "ok"
    assert len(glob.glob(os.path.join(os.path.dirname(victim), "*", "config.json"))) == 1  # no second run

    # new evaluation settings re-score the finished runs without retraining them
    calls.clear()
    assert ablate.main(argv + ["--cfg-scales", "1", "4"]) == 0
    assert calls == []
    for r in runs:
        result = json.loads(open(os.path.join(r["run_dir"], "results.json")).read())
        assert set(result["samples"]) == {"1", "4"}
    assert "cfg 4" in (grid / "table.md").read_text()
