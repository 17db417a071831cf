"""Tests of experiments/sweep.py on a tiny pixel run (8x8x3, 4 classes), scored with the small
classifier metric; sample.py runs in this process (the subprocess only adds start-up time)."""
import json
import os

import numpy as np
import pytest
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


def test_sweep_writes_table_and_plot_and_skips_finished_cells(run, tmp_path, monkeypatch, capsys):
    cells = []

    def in_process(launcher, argv):
        cells.append(argv)
        assert sample.cli(argv) == 0
    monkeypatch.setattr(sweep, "run_sample", in_process)
    argv = ["--result-dir", run, "--weights", "ema-0.05", "ema-0.08", "--cfg-scales", "1", "2", "--intervals", "0", "1",
            "0", "0.5", "--metric", "fd-classifier", "--num-samples", "8", "--sampler", "ddim",
            "--num-sampling-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "sw"),
            "--guide", os.path.join(run, "checkpoints", "0000002.pt")]
    assert sweep.cli(argv) == 0
    assert len(cells) == 6  # 2 widths x (scale 1 + scale 2 on each interval): scale 1 has no interval
    first = cells[-1]
    assert first[first.index("--guidance-interval") + 1:][:2] == ["0", "0.5"] and "--guide" in first
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "| sigma_rel | w = 1 | w = 2 |" in table and "| 0.08 |" in table and "| 0.05 |" in table
    assert table.count("guidance interval") == 2 and table.count("**") == 2 and "Best: ema-0." in table
    assert "real held-out images score" in table
    scores = {f: json.loads((tmp_path / "sw" / "cells" / f).read_text())["score"]
              for f in os.listdir(tmp_path / "sw" / "cells") if f.endswith(".json")}
    assert len(scores) == 6 and all(np.isfinite(v) and v >= 0 for v in scores.values())
    best = table.split("Best: ")[1].split(" ")[0]
    assert scores[f"{best}.json"] == min(scores.values())
    assert not any(f.endswith("-chunks") for f in os.listdir(tmp_path / "sw" / "cells"))
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
    (["--intervals", "0.8", "0.2"], "0 <= LO <= HI <= 1"),
    (["--intervals", "0", "1", "0.5"], "pairs"),
    (["--weights", "raw"], "ema-<sigma_rel>"),
    (["--metric", "fid"], "--reference"),
])
def test_bad_sweep_input_is_one_line(run, tmp_path, capsys, extra, needle):
    code = sweep.cli(["--result-dir", run, "--metric", "fd-classifier", "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "x")
