"""The path the repository exists for, end to end as a new user runs it: an ImageFolder -> `download.py
imagenet` with a VAE (a tiny random AutoencoderKL saved by save_pretrained) -> `torchrun` 2 gloo processes
training on the latents with sample grids and in-run FID -> `torchrun` 2 processes `sample.py --fid` ->
`fid.py` (the Inception architecture with random weights). Every step exits 0; the 2-process samples equal
the 1-process ones; the in-run FID equals fid.py's on the samples of the sample.py command the run logs."""
import json
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import download
import fid
import sample
from feature_nets import INCEPTION_ENV
from helpers import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_folder(path, classes=2, per_class=8, size=32):
    """classes x per_class PNGs: per class a colour gradient with noise, so the classes differ."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for c in range(classes):
        os.makedirs(path / f"class{c}")
        colour = rng.uniform(0, 1, (1, 1, 3))
        for i in range(per_class):
            image = 255 * (0.6 * colour * ramp + 0.4 * rng.uniform(0, 1, (size, size, 3)))
            Image.fromarray(image.astype(np.uint8)).save(path / f"class{c}" / f"{i:03d}.png")
    return str(path)


def test_latent_run_under_torchrun_with_grids_and_fid_end_to_end(tiny_vae, inception_weights, tmp_path):
    images = image_folder(tmp_path / "imagenet")
    vae = tiny_vae(levels=3, channels=(8,) * 3, layers_per_block=1)  # downsampling 4: 32x32 images, 8x8 latents
    latents = str(tmp_path / "latents")
    download.main(["imagenet", "--src", images, "--out", latents, "--image-size", "32", "--vae-path", vae,
                   "--num-workers", "0", "--no-progress"])
    with open(os.path.join(latents, "manifest.json")) as f:
        assert json.load(f)["shape"] == [4, 8, 8]

    env = dict(os.environ, OMP_NUM_THREADS="1", **{INCEPTION_ENV: inception_weights})
    results = tmp_path / "results"
    torchrun([os.path.join(ROOT, "train.py"), "--data-path", latents, "--results-dir", results, "--model", "DiT-XS/2",
              "--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "8", "--num-steps", "4",
              "--num-workers", "0", "--sample-every", "2", "--sample-steps", "2", "--eval-every", "4",
              "--eval-samples", "16", "--eval-reference", images, "--eval-metrics", "fid"], 2, ROOT, env)
    (run,) = results.glob("DiT-*")
    assert sorted(os.listdir(run / "samples")) == ["0000002.png", "0000004.png"]
    with open(run / "metrics.jsonl") as f:
        evaluations = [r for r in map(json.loads, f) if "eval" in r]
    assert [r["step"] for r in evaluations] == [4] and np.isfinite(evaluations[0]["eval"]["fid"])

    # The run logs the sample.py command that draws its evaluation's images: fid.py on them gives its FID.
    logged = re.search(r"the images of `python sample.py (.*?)`", (run / "log.txt").read_text()).group(1)
    argv = [str(run) if a == "RUN" else a for a in shlex.split(logged)] + ["--no-progress"]
    assert sample.cli([*argv, "--out", str(tmp_path / "logged.npz")]) == 0
    assert fid_of(tmp_path / "logged.npz", images, inception_weights, tmp_path) == pytest.approx(
        evaluations[-1]["eval"]["fid"], rel=1e-5)  # same images and network; the Inception batching may differ

    # Two processes draw the chunks k = 0, 1 of 8 samples each (rank k); one process draws both: the same .npz.
    two, one = tmp_path / "two.npz", tmp_path / "one.npz"
    torchrun([os.path.join(ROOT, "sample.py"), *argv, "--batch-size", "8", "--out", two], 2, ROOT, env)
    assert sample.cli([*argv, "--batch-size", "8", "--out", str(one)]) == 0
    a, b = np.load(two)["arr_0"], np.load(one)["arr_0"]
    assert a.shape == (16, 32, 32, 3) and np.array_equal(a, b)


def fid_of(samples, reference, inception_weights, tmp_path):
    """`fid.py SAMPLES REFERENCE` (exit 0) -> its FID."""
    out = tmp_path / "fid.json"
    fid.main([str(samples), reference, "--inception-weights", inception_weights, "--json", str(out),
              "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    with open(out) as f:
        return json.load(f)["fid"]
