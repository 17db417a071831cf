"""Watching a train.py run: TensorBoard events, sample grids over training (watch.py), logs without
carriage returns, and the demo's switch handling. Tiny runs on 8x8 pixels (DiT-XS/4 at depth 2, width 64)."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import runs
import train
import watch
from data import ShardWriter
from plots import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "DiT-XS/4", "--depth", "2", "--hidden-size", "64", "--num-heads", "4", "--global-batch-size", "8",
        "--num-workers", "0", "--sample-steps", "3", "--mp"]


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    writer = ShardWriter(path, "pixel", (3, 8, 8), 4)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(16) % 4, images=rng.integers(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    writer.finish()
    return str(path)


def run(data, results, *extra):
    return train.main(train.parse_args(["--data-path", data, "--results-dir", str(results), *TINY, *extra]))


def pixels_of(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def watched_run(pixels, tmp_path_factory):
    """Steps 1..5: logs at 2 and 4 (and 5, the last), magnitudes at 2 and 4 (and 5), grids at 2 and 4 (and 5)."""
    return run(pixels, tmp_path_factory.mktemp("watched"), "--num-steps", "5", "--log-every", "2",
               "--monitor-every", "2", "--sample-every", "2", "--ckpt-every", "5")


def test_tensorboard_holds_the_logged_scalars_magnitudes_and_grids(watched_run):
    events = EventAccumulator(os.path.join(watched_run, "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = read_metrics(os.path.join(watched_run, "metrics.jsonl"))
    logged = [r for r in records if "loss" in r]
    for key in ("loss", "mse", "vb", "lr", "grad_norm", "images_per_sec"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [r["step"] for r in logged] == [2, 4, 5]
        np.testing.assert_allclose([e.value for e in scalars], [r[key] for r in logged], rtol=1e-6)
    magnitudes = [r for r in records if "act_rms" in r]
    for key in ("act_rms", "weight_rms"):
        for block in (0, 1):
            scalars = events.Scalars(f"{key}/block{block:02d}")
            assert [e.step for e in scalars] == [2, 4, 5]
            np.testing.assert_allclose([e.value for e in scalars], [r[key][block] for r in magnitudes], rtol=1e-6)
    images = events.Images("samples")
    assert [i.step for i in images] == [2, 4, 5]
    grid = pixels_of(os.path.join(watched_run, "samples", "0000005.png"))
    assert (images[-1].height, images[-1].width) == grid.shape[:2]


def test_grids_come_at_the_right_steps_from_the_sampling_weights(watched_run):
    assert sorted(os.listdir(os.path.join(watched_run, "samples"))) == ["0000002.png", "0000004.png", "0000005.png"]
    grids = [pixels_of(os.path.join(watched_run, "samples", f"{s:07d}.png")) for s in (2, 4, 5)]
    assert grids[0].shape == (4 * 8 * 2, watch.GRID_COLUMNS * 8 * 2, 3)  # a row per class, 8x8 shown at 2x
    assert not np.array_equal(grids[0], grids[1])  # training changed the weights, and so the grid
    # the final grid again from the checkpoint's widest power EMA (what sample.py uses by default)
    ckpt = torch.load(os.path.join(watched_run, "checkpoints", "0000005.pt"), map_location="cpu", weights_only=True)
    saved = argparse.Namespace(**runs.saved_args(ckpt))
    model = runs.build_model(saved, ckpt["manifest"]).eval()
    model.load_state_dict(ckpt["ema_power"]["0.1"])
    grids_again = watch.SampleGrids(str(watched_run) + "-again", ckpt["manifest"], saved)
    grid, _ = grids_again(model, 5)
    np.testing.assert_array_equal(grid, grids[2])
    model.load_state_dict(ckpt["ema"])  # another set of weights gives another grid
    assert not np.array_equal(grids_again(model, 5)[0], grids[2])


def test_same_seed_same_grids_and_sample_every_0_writes_none(watched_run, pixels, tmp_path):
    again = run(pixels, tmp_path / "a", "--num-steps", "4", "--log-every", "2", "--monitor-every", "2",
                "--sample-every", "4", "--ckpt-every", "5")
    np.testing.assert_array_equal(pixels_of(os.path.join(again, "samples", "0000004.png")),
                                  pixels_of(os.path.join(watched_run, "samples", "0000004.png")))
    none = run(pixels, tmp_path / "b", "--num-steps", "2", "--sample-every", "0", "--log-every", "2",
               "--ckpt-every", "2")
    assert not os.path.exists(os.path.join(none, "samples"))
    assert os.path.isfile(os.path.join(none, "curves.png")) and os.path.isfile(os.path.join(none, "magnitudes.png"))


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """4x4x4 latents, 2 classes; make(vae) writes a dataset whose manifest names that VAE."""
    def make(vae):
        path = tmp_path_factory.mktemp("latents")
        writer = ShardWriter(path, "latent", (4, 4, 4), 2)
        rng = np.random.default_rng(0)
        writer.write_shard(0, np.arange(16) % 2, mean=rng.normal(size=(16, 4, 4, 4)).astype(np.float16),
                           std=np.full((16, 4, 4, 4), 0.1, np.float16))
        writer.finish(vae=vae)
        return str(path)
    return make


def test_latent_grids_are_decoded_by_the_manifests_vae_or_the_run_is_refused(latents, tiny_vae, tmp_path, capsys):
    """A VAE that cannot be opened is refused before training (one line, exit 2, no run directory):
    once grids or evaluations would need it, it is too late (the run dies mid-way and loses its work).
    --vae-path gives the VAE the manifest does not have; without grids or evaluations none is needed."""
    vae = tiny_vae(levels=4, channels=(8,) * 4, layers_per_block=1)  # downsampling 8: 4x4 latents -> 32x32
    argv = ["--num-steps", "2", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "2"]
    decoded = run(latents(vae), tmp_path / "a", *argv)
    grid = pixels_of(os.path.join(decoded, "samples", "0000002.png"))
    assert grid.shape == (2 * 64, watch.GRID_COLUMNS * 64, 3)  # 2 classes of 32x32 images, shown at 2x
    lost = latents(str(tmp_path / "no-such-vae"))
    capsys.readouterr()
    code = train.cli(["--data-path", lost, "--results-dir", str(tmp_path / "b"), *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no-such-vae" in err and "--vae-path" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "b") or os.listdir(tmp_path / "b") == []
    given = run(lost, tmp_path / "c", *argv, "--vae-path", vae)
    assert np.array_equal(pixels_of(os.path.join(given, "samples", "0000002.png")), grid)
    assert run(lost, tmp_path / "d", *argv[:-1], "0")  # no grids: no VAE needed


def train_processes(pixels, tmp_path, cases):
    """train.py in real processes, started at once (each python start-up takes seconds), each with stdout
    and stderr redirected to one file; cases: [(name, env changes, extra flags)]; returns {name: its text}."""
    launched = {}
    for name, env_extra, extra in cases:
        results = tmp_path / name
        results.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
        with open(results / "output.txt", "w") as f:
            launched[name] = subprocess.Popen(
                [sys.executable, "train.py", "--data-path", pixels, "--results-dir", str(results), *TINY,
                 "--num-steps", "3", "--log-every", "3", "--ckpt-every", "3", "--sample-every", "0", *extra],
                cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1", **env_extra}, stdout=f, stderr=subprocess.STDOUT)
    for name, proc in launched.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / name / "output.txt").read_text()[-3000:]
    return {name: (tmp_path / name / "output.txt").read_text() for name in launched}


def test_redirected_output_has_no_carriage_return_and_tqdm_disable_has_no_bar(pixels, tmp_path):
    texts = train_processes(pixels, tmp_path, [("plain", {}, ()), ("env", {"TQDM_DISABLE": "1"}, ()),
                                               ("flag", {}, ("--no-progress",))])
    assert "\r" not in texts["plain"] and "3/3 [" in texts["plain"]  # the bar as plain lines: its final count
    for name in ("env", "flag"):
        assert "\r" not in texts[name] and "3/3 [" not in texts[name] and "step/s" not in texts[name]
    assert all("step=3 loss=" in text for text in texts.values())  # the log lines stay


def test_the_demo_with_switches_trains_those_switches_alone(pixels):
    assert train.parse_args([]).mp is True  # the demo is MaP-DiT
    args = train.parse_args(["--use-cosine-attention"])
    assert args.mp is False and args.use_cosine_attention and not args.use_weight_normalization
    assert args.lr == 3e-3  # the demo's vanilla recipe: no weight normalisation among the switches
    assert train.parse_args(["--use-weight-normalization"]).lr == 2e-2  # the demo's weight-norm lr
    assert train.parse_args(["--use-cosine-attention", "--mp"]).mp is True  # explicit --mp wins
    assert train.parse_args(["--data-path", pixels, "--use-cosine-attention"]).mp is False


def test_wandb_missing_is_one_line_and_no_run_directory(pixels, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "wandb_installed", lambda: False)
    code = train.cli(["--data-path", pixels, "--results-dir", str(tmp_path / "res"), *TINY, "--wandb", "proj"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install wandb" in err
    assert not os.path.exists(tmp_path / "res")


def eval_records(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval" in r]


def test_in_run_evaluation_equals_the_evaluation_cli(pixels, tmp_path, inception_weights, monkeypatch):
    monkeypatch.setenv("MAPDIT_INCEPTION_WEIGHTS", inception_weights)
    run_dir = run(pixels, tmp_path / "res", "--num-steps", "2", "--log-every", "2", "--ckpt-every", "2",
                  "--sample-every", "0", "--eval-every", "2", "--eval-samples", "8", "--eval-metrics", "fid")
    (record,) = eval_records(run_dir)
    assert record["step"] == 2 and record["samples"] == 8 and set(record["eval"]) == {"fid"}
    # the same 8 samples again from the checkpoint's sampling weights, scored by fid.py in its own process
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "0000002.pt"), map_location="cpu", weights_only=True)
    args = argparse.Namespace(**runs.saved_args(ckpt))
    model = runs.build_model(args, ckpt["manifest"]).eval()
    model.load_state_dict(ckpt["ema_power"]["0.1"])
    images = watch.Evaluation(args, ckpt["manifest"]).images(model)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    subprocess.run([sys.executable, "fid.py", str(tmp_path / "samples.npz"), pixels, "--metrics", "fid", "--no-cache",
                    "--no-progress", "--json", str(tmp_path / "cli.json"), "--inception-weights", inception_weights],
                   cwd=ROOT, check=True, timeout=600, capture_output=True)
    with open(tmp_path / "cli.json") as f:
        cli = json.load(f)
    assert cli["fid"] == pytest.approx(record["eval"]["fid"], rel=1e-9) and cli["num_samples"] == 8


def test_the_fallback_classifier_gives_an_fd_curve_and_is_trained_once(pixels, tmp_path):
    argv = ["--num-steps", "4", "--log-every", "2", "--ckpt-every", "4", "--sample-every", "0", "--eval-every", "2",
            "--eval-samples", "8", "--eval-metrics", "fd_classifier"]
    first = run(pixels, tmp_path, *argv)
    records = eval_records(first)
    assert [r["step"] for r in records] == [2, 4] and all(r["eval"]["fd_classifier"] > 0 for r in records)
    events = EventAccumulator(os.path.join(first, "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/fd_classifier")] == \
        [(r["step"], pytest.approx(r["eval"]["fd_classifier"], rel=1e-6)) for r in records]
    assert len(os.listdir(tmp_path / "eval-cache")) >= 2  # the classifier and the reference statistics
    second = run(pixels, tmp_path, *argv, "--seed", "1")
    with open(os.path.join(first, "log.txt")) as f1, open(os.path.join(second, "log.txt")) as f2:
        assert "trained the evaluation classifier" in f1.read() and "trained the evaluation" not in f2.read()


def test_evaluation_arguments_that_cannot_work_are_one_line(pixels, latents, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAPDIT_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))  # no Inception weights
    res = tmp_path / "res"
    cases = [(["--data-path", latents(str(tmp_path / "vae")), "--eval-every", "2"], "needs --eval-reference"),
             (["--data-path", pixels, "--eval-every", "2", "--eval-metrics", "fid"], "fid needs weights"),
             (["--data-path", pixels, "--eval-every", "2", "--eval-metrics", "fd_nope"], "unknown metric"),
             (["--data-path", pixels, "--eval-every", "2", "--eval-samples", "1"], "--eval-samples 1"),
             (["--data-path", pixels, "--sample-every", "-1"], "--sample-every -1")]
    for argv, needle in cases:
        code = train.cli([*argv, "--results-dir", str(res), *TINY])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
    assert not os.path.exists(res)
    assert train.parse_args(["--data-path", pixels, "--eval-every", "2"]).eval_metrics == ["fd_classifier"]


def test_an_evaluation_that_would_fail_mid_run_is_refused_before_training(pixels, tmp_path, inception_weights,
                                                                         monkeypatch, capsys):
    """Issue 21: a reference that is a weights file, an empty folder or images of another size than the
    samples (8x8 here), or pr with fewer samples than its k + 1 neighbours, trained first and died at the
    first evaluation with a traceback and a run directory: one line, exit 2, no run directory now."""
    monkeypatch.setenv("MAPDIT_INCEPTION_WEIGHTS", inception_weights)
    (tmp_path / "empty").mkdir()
    (tmp_path / "big" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "big" / "a" / f"{i}.png")
    cases = [(["--eval-reference", inception_weights], inception_weights),
             (["--eval-reference", str(tmp_path / "empty")], "empty"),
             (["--eval-reference", str(tmp_path / "big")], "16x16 images, but the run's samples are 8x8"),
             (["--eval-metrics", "pr", "--eval-samples", "3"], "at least 4 samples")]
    res = tmp_path / "res"
    for argv, needle in cases:
        code = train.cli(["--data-path", pixels, "--results-dir", str(res), *TINY, "--eval-every", "2",
                          "--eval-metrics", "fid", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1 and len(err) < 400, (argv, err)
        assert not os.path.exists(res)


def test_two_runs_sharing_the_evaluation_cache_both_finish(pixels, tmp_path):
    """Issue 21: two runs with different seeds in one --results-dir, each evaluating, started together:
    one died with FileNotFoundError (the reference statistics' feature chunks and the classifier were
    written under shared names without a lock). Both finish now, with the numbers a run alone gets.
    fd_classifier exercises both: its classifier and its reference statistics' chunks (Inception's go
    through the same chunk and cache code, at ten times the CPU cost)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(results, seed):
        return subprocess.Popen(
            [sys.executable, "train.py", "--data-path", pixels, "--results-dir", str(results), *TINY, "--seed", seed,
             "--num-steps", "2", "--log-every", "2", "--ckpt-every", "2", "--sample-every", "0", "--eval-every", "2",
             "--eval-samples", "8", "--eval-metrics", "fd_classifier"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def finish(*launches):
        for launched in launches:
            _, err = launched.communicate(timeout=600)
            assert launched.returncode == 0, err[-3000:]

    finish(launch(tmp_path / "res", "0"), launch(tmp_path / "res", "1"))
    finish(launch(tmp_path / "alone", "1"))
    together = {r["seed"]: r["eval"] for r in map(eval_record_and_seed, run_dirs(tmp_path / "res"))}
    (alone,) = map(eval_record_and_seed, run_dirs(tmp_path / "alone"))
    assert sorted(together) == [0, 1] and together[1] == alone["eval"]  # same process settings: bit for bit


def eval_record_and_seed(run_dir):
    (record,) = eval_records(run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        return dict(eval=record["eval"], seed=json.load(f)["seed"])


def run_dirs(results_dir):
    return [p.parent for p in results_dir.glob("*/config.json")]
