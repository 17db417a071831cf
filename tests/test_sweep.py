"""Tests of experiments/sweep.py on a tiny pixel run (8x8x3, 4 classes), scored with the small
classifier metric; sample.py runs in this process (the subprocess only adds start-up time)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from data import ShardWriter
from experiments import sweep

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # in diffusers
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    writer = ShardWriter(root / "data", "pixel", (3, 8, 8), 4)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(32) % 4, images=rng.integers(0, 256, (32, 3, 8, 8), dtype=np.uint8))
    writer.finish()
    return train.main(train.parse_args([
        "--data-path", str(root / "data"), "--results-dir", str(root / "results"), "--model", "DiT-XS/4", "--mp",
        "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8", "--num-workers", "0",
        "--num-steps", "4", "--ckpt-every", "2", "--snapshot-every", "1", "--log-every", "2",
        "--monitor-every", "100", "--sample-steps", "2"]))


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """One --eval-dir for the sweeps of these tests: the small classifier is trained once."""
    return str(tmp_path_factory.mktemp("eval"))


@pytest.fixture
def cells(monkeypatch):
    """The sample.py argument lists of the cells sampled, each run by sample.py in this process."""
    sampled = []

    def in_process(launcher, argv):
        sampled.append(argv)
        assert sample.cli(argv) == 0
    monkeypatch.setattr(sweep, "run_sample", in_process)
    return sampled


def tiny_grid(run, out, eval_dir, *extra):
    return ["--result-dir", run, "--weights", "ema-0.05", "--cfg-scales", "1", "--metric", "fd-classifier",
            "--num-samples", "8", "--sampler", "ddim", "--num-sampling-steps", "2", "--batch-size", "8",
            "--out", str(out), "--eval-dir", eval_dir, *extra]


def test_sweep_writes_table_and_plot_and_skips_finished_cells(run, tmp_path, monkeypatch, capsys, cells):
    legends = []
    plot_sweep = sweep.plots.plot_sweep
    monkeypatch.setattr(sweep.plots, "plot_sweep", lambda *a: legends.append([ln[0] for ln in a[1]]) or plot_sweep(*a))
    argv = ["--result-dir", run, "--weights", "ema-0.05", "ema-0.08", "--cfg-scales", "1", "2", "--intervals",
            "0", "inf", "0", "2.33", "--metric", "fd-classifier", "--num-samples", "8", "--sampler", "ddim",
            "--num-sampling-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "sw"),
            "--guide", os.path.join(run, "checkpoints", "0000002.pt")]
    assert sweep.cli(argv) == 0
    assert len(cells) == 6  # 2 widths x (scale 1 + scale 2 on each interval): scale 1 has no interval
    first = cells[-1]
    assert first[first.index("--guidance-interval") + 1:][:2] == ["0", "2.33"] and "--guide" in first
    assert cells[0][cells[0].index("--guidance-interval") + 1:][:2] == ["0", "inf"]  # every step: sample.py's default
    names = {"ema-0.05-cfg1.npz", "ema-0.05-cfg2.npz", "ema-0.05-cfg2-sigma0-2.33.npz"}  # sigma0-inf: no tag
    assert names <= set(os.listdir(tmp_path / "sw")) and names <= set(os.listdir(tmp_path / "sw" / "samples"))
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| sigma_rel | w = 1 | w = 2 |" in table and "| 0.08 |" in table and "| 0.05 |" in table
    assert "guidance interval 0 < sigma <= inf:" in table and "guidance interval 0 < sigma <= 2.33:" in table
    assert legends[-1] == ["w = 1, 0 < sigma <= inf", "w = 2, 0 < sigma <= inf", "w = 1, 0 < sigma <= 2.33",
                           "w = 2, 0 < sigma <= 2.33"]
    assert table.count("guidance interval") == 2 and table.count("**") == 2 and "Best: ema-0." in table
    assert "training images score" in table
    scores = {f: float(np.load(tmp_path / "sw" / f)["score"])
              for f in os.listdir(tmp_path / "sw") if f.endswith(".npz")}
    assert len(scores) == 6 and all(np.isfinite(v) and v >= 0 for v in scores.values())
    best = table.split("Best: ")[1].split(" ")[0]
    assert scores[f"{best}.npz"] == min(scores.values())
    assert not any(f.endswith("-chunks") for f in os.listdir(tmp_path / "sw" / "samples"))
    assert Image.open(tmp_path / "sw" / "sweep.png").size[0] > 100

    cells.clear()
    make_scorer = sweep.make_scorer
    monkeypatch.setattr(sweep, "make_scorer", lambda args: pytest.fail("a finished cell was scored again"))
    assert sweep.cli(argv) == 0 and cells == []
    assert (tmp_path / "sw" / "sweep.md").read_text() == table
    monkeypatch.setattr(sweep, "make_scorer", make_scorer)
    grown = [*argv[: argv.index("--weights") + 1], "ema-0.05", "ema-0.08", "ema-0.12",
             *argv[argv.index("--cfg-scales"):]]
    assert sweep.cli(grown) == 0 and len(cells) == 3  # only the new width's cells are sampled
    assert "| 0.12 |" in (tmp_path / "sw" / "sweep.md").read_text()
    capsys.readouterr()

    code = sweep.cli([*argv, "--num-samples", "9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "other num_samples" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, needle", [
    (["--intervals", "0.8", "0.2"], "0 <= LO <= HI"),
    (["--intervals", "0", "1", "0.5"], "pairs"),
    (["--weights", "raw"], "ema-<sigma_rel>"),
    (["--metric", "fid"], "no Inception weights"),  # its reference: the run's data, as train.py's
])
def test_bad_sweep_input_is_one_line(run, tmp_path, capsys, extra, needle):
    code = sweep.cli(["--result-dir", run, "--metric", "fd-classifier", "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x")


@pytest.fixture
def own_run(run, tmp_path):
    """A copy of the run that may train on (gain checkpoints) without touching the shared one."""
    return shutil.copytree(run, tmp_path / "run")


def test_sweep_samples_one_checkpoint_recorded_once(own_run, tmp_path, eval_dir, monkeypatch, capsys, cells):
    loaded, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(os.path.realpath(f)) or load(f, *a, **k))
    ckpt = lambda step: os.path.realpath(own_run / "checkpoints" / f"{step:07d}.pt")  # noqa: E731
    ckpts_loaded = lambda: {f for f in loaded if re.search(r"checkpoints/\d{7}\.pt$", f)}  # noqa: E731
    older = tiny_grid(str(own_run), tmp_path / "older", eval_dir, "--ckpt", ckpt(2))
    assert sweep.cli(older) == 0 and len(cells) == 1
    assert cells[0][cells[0].index("--ckpt") + 1] == ckpt(2) and "--result-dir" not in cells[0]
    assert ckpts_loaded() == {ckpt(2)}  # sample.py and the fd-classifier scorer read the chosen checkpoint alone
    assert json.loads((tmp_path / "older" / "settings.json").read_text())["ckpt"] == ckpt(2)

    out, cells[:] = tmp_path / "newest", []
    assert sweep.cli(tiny_grid(str(own_run), out, eval_dir)) == 0
    assert json.loads((out / "settings.json").read_text())["ckpt"] == ckpt(4)  # the newest when first made
    shutil.copy(ckpt(4), own_run / "checkpoints" / "0000006.pt")  # the run trained on
    loaded[:] = []
    grown = tiny_grid(str(own_run), out, eval_dir, "--cfg-scales", "1", "2")
    assert sweep.cli(grown) == 0 and len(cells) == 2
    assert cells[1][cells[1].index("--ckpt") + 1] == ckpt(4) and ckpts_loaded() == {ckpt(4)}
    assert json.loads((out / "settings.json").read_text())["ckpt"] == ckpt(4)
    capsys.readouterr()

    assert sweep.cli([*grown, "--weights", "ema-0.08", "--ckpt", ckpt(6)]) == 2 and len(cells) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ckpt(4) in err and ckpt(6) in err, err


def test_duplicate_grid_values_are_merged(run, tmp_path, eval_dir, cells):
    out = tmp_path / "dup"
    argv = tiny_grid(run, out, eval_dir, "--weights", "ema-0.05", "ema-0.050", "--cfg-scales", "2", "2.0",
                     "--intervals", "0", "inf", "0", "inf")
    assert sweep.cli(argv) == 0 and len(cells) == 1
    table = (out / "sweep.md").read_text()
    assert "| sigma_rel | w = 2 |\n" in table and table.count("| 0.05 |") == 1
    assert table.count("guidance interval") == 1 and table.count("**") == 2


@pytest.mark.parametrize("extra, needle", [
    (["--cfg-scales", "1", "nan"], "--cfg-scales nan"),
    (["--cfg-scales", "inf"], "--cfg-scales inf"),
    (["--intervals", "0", "inf", "0", "nan"], "0 <= LO <= HI"),
    (["--weights", "ema-0.05", "ema-0.5"], "ema-0.5"),  # no power EMA that wide (ema.valid_sigma_rel)
    (["--weights", "ema-0"], "ema-0"),
    (["--weights", "ema-1e-1"], "ema-<sigma_rel>"),  # sample.py reads plain decimals only
    (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2 ** 32)], "--seed 4294967296"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-sampling-steps", "1001"], "--num-sampling-steps"),
    (["--ckpt", "missing.pt"], "missing.pt"),
])
def test_the_whole_grid_is_checked_before_anything_is_sampled(run, tmp_path, eval_dir, monkeypatch, capsys,
                                                               extra, needle):
    monkeypatch.setattr(sweep, "run_sample", lambda *a: pytest.fail("a cell was sampled"))
    code = sweep.cli([*tiny_grid(run, tmp_path / "x", eval_dir), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x")  # no OUT, no settings.json


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{name: path} of references an 8x8 fid sweep cannot use, and one it can."""
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for name, side in (("other-size", 16), ("good", 8)):
        os.makedirs(root / name)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "weights.pt").write_bytes(b"not an npz")
    return {"missing": str(root / "mistyped.npz"), "other-size": str(root / "other-size"),
            "weights": str(root / "weights.pt"), "good": str(root / "good")}


@pytest.mark.parametrize("name, needle", [("missing", "mistyped.npz"), ("other-size", "16x16 images"),
                                          ("weights", "weights.pt")])
def test_a_bad_reference_is_refused_before_anything_is_sampled(run, tmp_path, references, inception_weights,
                                                               monkeypatch, capsys, name, needle):
    monkeypatch.setattr(sweep, "run_sample", lambda *a: pytest.fail("a cell was sampled"))
    argv = ["--result-dir", run, "--weights", "ema-0.05", "--cfg-scales", "1", "--num-samples", "8",
            "--out", str(tmp_path / "x"), "--inception-weights", str(inception_weights)]
    code = sweep.cli([*argv, "--reference", references[name]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x")
    sweep.check_inputs(sweep.parse_args([*argv, "--reference", references["good"]]))  # 8x8 images: accepted


def test_two_sweeps_on_one_out_take_turns(run, tmp_path, eval_dir):
    """The first sweep's only cell waits at a gate (its launcher) until the second has said it waits for
    the first; both then finish, the second with the first's cell and the same table."""
    gate, script = tmp_path / "gate", tmp_path / "gated.py"
    script.write_text(f"import os, runpy, sys, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.05)\n"
                      "sys.argv = sys.argv[1:]\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, os.path.join(sweep.ROOT, "experiments", "sweep.py"),
           *tiny_grid(run, tmp_path / "out", eval_dir, "--launcher", shlex.join([sys.executable, str(script)]))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    second = None
    try:
        assert any("[sweep] cell 1/1" in line for line in first.stderr)  # at the gate, inside its sweep
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        said = next((line for line in second.stderr if "waiting for" in line or "[sweep]" in line), "")
    finally:
        gate.touch()
        (out1, err1), (out2, err2) = [p.communicate(timeout=300) for p in (first, second) if p]
    assert "waiting for another process that writes in" in said and str(tmp_path / "out") in said, said + err2
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert "[sweep] cell" not in err2  # the second found the first's cell scored
    score = float(np.load(tmp_path / "out" / "ema-0.05-cfg1.npz")["score"])
    assert out1.splitlines()[-1] == out2.splitlines()[-1] == \
        f"best: ema-0.05-cfg1 (fd_classifier {score:.4g}); wrote {tmp_path / 'out'}/sweep.md and sweep.png"
    assert f"| 0.05 | **{score:.4g}** |" in (tmp_path / "out" / "sweep.md").read_text()


def test_the_default_metric_reference_and_cache_are_train_pys(run, tmp_path, monkeypatch):
    """Without the Inception weights a pixel run is scored as train.py scores it in-run: fd_classifier
    against its own training data, with the classifier and statistics in train.py's RESULTS/eval-cache
    (nothing copied into OUT); with the weights, fid."""
    monkeypatch.delenv("MAPDIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    args = sweep.parse_args(["--result-dir", run, "--out", str(tmp_path / "out")])
    sweep.check_inputs(args)
    saved = json.loads(open(os.path.join(run, "config.json")).read())
    assert args.metric == "fd_classifier" and args.reference == os.path.abspath(saved["data_path"])
    assert args.eval_dir == os.path.join(os.path.dirname(os.path.abspath(run)), "eval-cache")
    assert not os.path.exists(tmp_path / "out")
    monkeypatch.setattr(sweep.evaluation, "available_metrics", lambda *a: ["fid"])
    args = sweep.parse_args(["--result-dir", run, "--out", str(tmp_path / "out")])
    sweep.check_inputs(args)
    assert args.metric == "fid"


@pytest.fixture(scope="module")
def flow_run(run):
    """A flow run of the same data beside `run` (same results dir: the same classifier cache)."""
    results = os.path.dirname(run)
    return train.main(train.parse_args([
        "--data-path", os.path.join(os.path.dirname(results), "data"), "--results-dir", results, "--model", "DiT-XS/4",
        "--mp", "--objective", "flow", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
        "--global-batch-size", "8", "--num-workers", "0", "--num-steps", "2", "--ckpt-every", "2",
        "--log-every", "2", "--monitor-every", "100", "--sample-steps", "2"]))


def test_the_sweep_samples_a_flow_run_with_a_flow_sampler(flow_run, tmp_path, eval_dir, cells, capsys):
    argv = tiny_grid(flow_run, tmp_path / "out", eval_dir)
    argv[argv.index("ddim")] = "euler"
    assert sweep.cli(argv) == 0 and cells[0][cells[0].index("--sampler") + 1] == "euler"
    assert sweep.cli(tiny_grid(flow_run, tmp_path / "other", eval_dir)) == 2  # ddim: a DDPM sampler, refused
    assert "the run is a flow run; choose one of euler" in capsys.readouterr().err  # before any cell
    default = [a for a in tiny_grid(flow_run, tmp_path / "default", eval_dir, "--num-samples", "4")]
    del default[default.index("--sampler"):default.index("--sampler") + 2]
    assert sweep.cli(default) == 0 and cells[-1][cells[-1].index("--sampler") + 1] == "heun"


def test_sampler_cost_scores_every_fixed_step_sampler_of_each_objective(run, flow_run, tmp_path, monkeypatch):
    from experiments import sampler_cost
    out = tmp_path / "cost"
    argv = ["--runs", run, flow_run, "--steps", "2", "3", "--num-samples", "4", "--out", str(out)]
    judged = []
    monkeypatch.setattr(sampler_cost, "consistency", lambda net, x, y: judged.append(y) or 0.5)
    results = sampler_cost.main(sampler_cost.parse_args(argv))
    monkeypatch.undo()
    assert sample.cli(["--result-dir", run, "--fid", "4", "--cfg-scale", "1", "--sampler", "ddim",
                       "--num-sampling-steps", "2", "--out", str(tmp_path / "own.npz")]) == 0
    drawn = np.load(tmp_path / "own-chunks" / "000000.npz")["labels"]
    assert all(np.array_equal(y, drawn) for y in judged)  # each cell is judged by the labels sample.py drew
    cells = {(r["objective"], r["sampler"], r["steps"]): r for r in results}
    assert set(cells) == {(o, s, n) for o in ("ddpm", "flow") for s in sampling_names(o) for n in (2, 3)}
    assert all(r["nfe"] == r["steps"] * (2 if r["sampler"] == "heun" else 1) for r in results)
    assert all(np.isfinite(r["fd_classifier"]) and 0 <= r["class_consistency"] <= 1 for r in results)
    table = (out / "sampler_cost.md").read_text()
    assert table.count("| NFE |") == 2 and "| ddim (ddpm run) |" in table and "heun (flow run)" in table and (out / "sampler_cost.png").is_file()
    monkeypatch.setattr(sampler_cost, "score_cell", lambda *a: pytest.fail("a scored cell was scored again"))
    assert sampler_cost.main(sampler_cost.parse_args(argv)) == results
    assert sampler_cost.cli(argv + ["--seed", "1"]) == 2  # cells of another seed do not mix


def sampling_names(objective):
    from sampling import SAMPLERS
    return [s for s in SAMPLERS[objective] if s != "dopri5"]
