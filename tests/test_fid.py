"""Tests of fid.py, the command line of evaluation.py: the Frechet distance against closed forms,
statistics, and the CLI (results, JSON, the default metric list, one-line errors)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation
import feature_nets
import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_commuting_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_non_commuting():
    rng = np.random.default_rng(1)
    # 2 x 2: the eigenvalues l1, l2 of S1 S2 give tr((S1 S2)^1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
    tr_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert evaluation.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    # 6 x 6: against the eigenvalues of the non-symmetric product S2 S1, a second route.
    s1, s2 = random_spd(rng, 6), random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr_root = np.sqrt(np.linalg.eigvals(s2 @ s1).real).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    got = evaluation.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert evaluation.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_distance_singular_covariance_and_bad_shapes():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(10, 32))  # fewer samples than dimensions: a rank-9 covariance
    mu, sigma = evaluation.feature_stats(features)
    assert sigma.dtype == np.float64 and sigma.shape == (32, 32)
    assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    with pytest.raises(ValueError):
        evaluation.frechet_distance(mu, sigma, mu[:5], sigma[:5, :5])


def test_statistics_of_gaussian_samples_approach_the_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.5])
    s1, s2 = random_spd(rng, 4), random_spd(rng, 4)
    n = 200_000
    x1 = rng.multivariate_normal(mu1, s1, n)
    x2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, n))  # torch input works too
    m1, c1 = evaluation.feature_stats(x1)
    m2, c2 = evaluation.feature_stats(x2)
    np.testing.assert_allclose(m1, mu1, atol=0.03)
    np.testing.assert_allclose(c1, s1, atol=0.05 * np.abs(s1).max())
    want = evaluation.frechet_distance(mu1, s1, mu2, s2)
    assert evaluation.frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=0.02)


def run_fid(argv, env_extra=None, home=None):
    """fid.py in a subprocess with an empty torch hub cache: (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (feature_nets.INCEPTION_ENV, feature_nets.DINOV2_ENV)}
    env.update(TORCH_HOME=str(home), **(env_extra or {}))
    p = subprocess.run([sys.executable, "fid.py", *map(str, argv)], cwd=ROOT, env=env, text=True,
                       capture_output=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_cli_precomputed_statistics_json_and_one_line_errors(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(5)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b, other, text = (str(tmp_path / f) for f in ("a.npz", "b.npz", "other.npz", "text.npz"))
    np.savez(a, mu=mu1, sigma=s1, mu_s=mu2, sigma_s=s2)
    np.savez(b, mu=mu2, sigma=s2, mu_s=mu1, sigma_s=s1, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(other, x=np.zeros(3))
    with open(text, "w") as f:
        f.write("not an archive")
    small, large = tmp_path / "small.npz", tmp_path / "large.npz"
    evaluation.write_npz_samples(small, rng.integers(0, 256, (4, 8, 8, 3), np.uint8))
    evaluation.write_npz_samples(large, rng.integers(0, 256, (4, 16, 16, 3), np.uint8))
    truncated = tmp_path / "truncated.npz"
    data = large.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a full disk's leftover
    monkeypatch.delenv(feature_nets.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(feature_nets.DINOV2_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights anywhere
    # statistics on both sides need no network: FID and sFID from mu, sigma, mu_s, sigma_s
    out_json = tmp_path / "out.json"
    fid.main([a, b, "--metrics", "fid,sfid", "--json", str(out_json)])
    out = capsys.readouterr().out.splitlines()
    want = evaluation.frechet_distance(mu1, s1, mu2, s2)
    assert out[0] == f"FID: {want:.4f}" and out[1].startswith("sFID: ")
    result = json.loads(out_json.read_text())
    assert result["fid"] == pytest.approx(want) and result["sfid"] == pytest.approx(
        evaluation.frechet_distance(mu2, s2, mu1, s1))
    assert result["num_samples"] is None and result["num_reference"] == 2
    for args, needle in [([a, other], "neither arr_0 images nor mu and sigma"), ([a], "required"),
                         ([small, a, "--metrics", "fid", "--inception-weights", "/nope"], "/nope: weights file not found"),
                         ([small, a, "--metrics", "fid"], feature_nets.INCEPTION_FILE),
                         ([small, b, "--metrics", "fd_dinov2"], feature_nets.DINOV2_URL),
                         ([small, a, "--metrics", "is,fid,nope"], "unknown metric 'nope'"),
                         ([a, b, "--metrics", "is"], "a.npz holds no images"),
                         ([small, large, "--metrics", "fid"], "samples are 8x8, the reference 16x16"),
                         ([truncated, a], "truncated.npz: not a readable .npz"),
                         ([text, a], "text.npz: not a readable .npz"),
                         ([small, str(tmp_path / "missing.npz")], "missing.npz: no such file"),
                         ([a, b, "--batch-size", "0"], "--batch-size")]:
        code = fid.cli([str(x) for x in args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert needle in err, (args, err)


def test_cli_default_metrics_are_those_whose_weights_are_found(tmp_path, capsys, monkeypatch):
    """With an Inception weights file and no DINOv2 weights the default list is fid, sfid, is and pr
    (fd_dinov2 alone is one line naming its file: the test above). The network is a small stand-in
    in Inception's place (the real one on 2048-d features is tested in test_evaluation.py)."""
    from test_evaluation import TinyInception
    weights = tmp_path / feature_nets.INCEPTION_FILE
    weights.write_bytes(b"")  # found is enough: load_network is replaced
    monkeypatch.setattr(evaluation, "load_network", lambda *args: TinyInception())
    monkeypatch.delenv(feature_nets.DINOV2_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rng = np.random.default_rng(6)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    evaluation.write_npz_samples(samples, rng.integers(0, 256, (40, 8, 8, 3), np.uint8))
    evaluation.write_npz_samples(ref, rng.integers(0, 256, (30, 8, 8, 3), np.uint8))
    fid.main([str(samples), str(ref), "--inception-weights", str(weights), "--json", str(tmp_path / "r.json"),
              "--batch-size", "4"])
    captured = capsys.readouterr()
    result = json.loads((tmp_path / "r.json").read_text())
    assert sorted(result) == ["fid", "is", "num_reference", "num_samples", "precision", "recall", "sfid"]
    assert (result["num_samples"], result["num_reference"]) == (40, 30)
    assert [line.split(":")[0] for line in captured.out.splitlines()] == ["FID", "sFID", "IS", "Precision", "Recall"]
    assert (tmp_path / "ref.npz.inception-stats.npz").is_file()  # the reference's cache
    assert not (tmp_path / "samples-features").exists()  # the feature chunks go once done
    progress = captured.err.splitlines()  # plain lines when stderr is not a terminal
    assert "\r" not in captured.err and progress[-1].startswith("inception features of") and "30/30" in progress[-1]


def test_missing_weights_in_a_real_process_is_one_line(tmp_path):
    samples = evaluation.write_npz_samples(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    code, out, err = run_fid([samples, samples, "--metrics", "fid"], home=tmp_path / "home")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert feature_nets.INCEPTION_FILE in err and feature_nets.INCEPTION_URL in err


def test_cli_bad_inputs_are_one_line_errors_not_tracebacks_or_nan(tmp_path, capsys, monkeypatch, inception_weights):
    """Each is refused before any feature is extracted, as one line naming the problem, exit code 2
    (they were a ValueError or RuntimeError traceback, or exit 0 with "FID: nan")."""
    from PIL import Image
    rng = np.random.default_rng(7)
    three, ref = tmp_path / "three.npz", tmp_path / "ref.npz"
    evaluation.write_npz_samples(three, rng.integers(0, 256, (3, 8, 8, 3), np.uint8))
    evaluation.write_npz_samples(ref, rng.integers(0, 256, (8, 8, 8, 3), np.uint8))
    one = tmp_path / "one"
    os.makedirs(one)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(one / "0.png")
    s8, s16 = random_spd(rng, 8), random_spd(rng, 16)
    stats8, stats16, nan = (str(tmp_path / f) for f in ("stats8.npz", "stats16.npz", "nan.npz"))
    np.savez(stats8, mu=np.zeros(8), sigma=s8)
    np.savez(stats16, mu=np.zeros(16), sigma=s16)
    np.savez(nan, mu=np.full(8, np.nan), sigma=s8)
    weights = ["--inception-weights", inception_weights]
    cases = [([three, ref, "--metrics", "pr", *weights], "three.npz holds 3 images; precision/recall need more"),
             ([one, ref, "--metrics", "fid", *weights], "one: holds 1 image; statistics need 2 or more"),
             ([three, stats8, "--metrics", "fid", *weights], "the fid statistics of"),  # 2048-d features, 8-d mu
             ([stats16, stats8, "--metrics", "fid"], "16-d"),
             ([stats8, nan, "--metrics", "fid"], "nan.npz: its fid statistics hold non-finite values"),
             ([three, ref, "--metrics", "fid", "--device", "bogus", *weights], "device bogus: not usable here")]
    if not torch.cuda.is_available():
        cases.append(([three, ref, "--metrics", "fid", "--device", "cuda", *weights], "device cuda: not usable here"))
    for args, needle in cases:
        code = fid.cli([str(x) for x in args])
        captured = capsys.readouterr()
        assert code == 2 and len(captured.err.strip().splitlines()) == 1, (args, captured.err)
        assert needle in captured.err and captured.out == "", (args, captured.err)
    assert sorted(os.listdir(tmp_path)) == ["nan.npz", "one", "ref.npz", "stats16.npz", "stats8.npz", "three.npz"]


def test_cli_fd_dinov2_against_training_images_beside_fid_against_the_batch(tmp_path, capsys, monkeypatch):
    """--dinov2-reference: FID against the ADM batch and FD-DINOv2 against the training images in one
    call, each equal to a call against that reference alone; the training images' statistics are
    cached. Against the batch's images, the FD-DINOv2 line says it is not EDM2's number. Small
    stand-ins in place of Inception and DINOv2."""
    from PIL import Image
    from test_evaluation import TinyInception, TinyNet, random_images

    class TinyDINOv2(TinyNet):
        name, outputs = "dinov2", {"cls": 8}

        def __call__(self, batch):
            return {"cls": super().__call__(batch)["features"]}

    dinov2 = TinyDINOv2()
    monkeypatch.setattr(evaluation, "load_network", lambda name, *a: TinyInception() if name == "inception" else dinov2)
    samples, batch, train = str(tmp_path / "samples.npz"), str(tmp_path / "batch.npz"), tmp_path / "train"
    evaluation.write_npz_samples(samples, random_images(12, seed=21))
    evaluation.write_npz_samples(batch, random_images(10, seed=22))
    os.makedirs(train)
    for i, im in enumerate(random_images(14, seed=23)):
        Image.fromarray(im).save(train / f"{i:02d}.png")
    argv = [samples, batch, "--metrics", "fid,fd_dinov2", "--dinov2-reference", str(train), "--batch-size", "4",
            "--no-progress"]
    fid.main(argv + ["--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out.splitlines()
    result = json.loads((tmp_path / "r.json").read_text())
    alone = lambda ref, metric: evaluation.evaluate(samples, ref, [metric], cache=False, progress=False)[metric]  # noqa: E731
    assert result["fid"] == pytest.approx(alone(batch, "fid"), rel=1e-9)
    assert result["fd_dinov2"] == pytest.approx(alone(str(train), "fd_dinov2"), rel=1e-9)
    assert abs(result["fd_dinov2"] - alone(batch, "fd_dinov2")) > 1e-3 * result["fd_dinov2"]  # not the batch's
    assert (result["num_reference"], result["num_dinov2_reference"]) == (10, 14)
    assert out == [f"FID: {result['fid']:.4f}", f"FD-DINOv2: {result['fd_dinov2']:.4f}"]
    assert (tmp_path / "train.dinov2-stats.npz").is_file() and not (tmp_path / "batch.npz.dinov2-stats.npz").exists()
    calls = dinov2.calls
    fid.main(argv)
    assert dinov2.calls == calls + 3 and capsys.readouterr().out.splitlines() == out  # the samples' 3 batches only
    fid.main([samples, batch, "--metrics", "fd_dinov2", "--no-progress"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("FD-DINOv2: ") and f"against the 10 images of {batch}" in line and "not comparable" in line
    code = fid.cli([samples, batch, "--metrics", "fid", "--dinov2-reference", str(train)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fd_dinov2 is not among" in err


def test_reference_subsample_scores_against_random_reference_images(tmp_path, capsys, monkeypatch):
    """Issue 22: --reference-subsample N scores against N reference images drawn with --subsample-seed
    (not the batch's precomputed statistics of them all), the number of those images alone, cached
    apart from the whole reference's statistics."""
    from test_evaluation import TinyInception
    monkeypatch.setattr(evaluation, "load_network", lambda *args: TinyInception())
    rng = np.random.default_rng(7)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    evaluation.write_npz_samples(samples, rng.integers(0, 256, (20, 8, 8, 3), np.uint8))
    images = rng.integers(0, 256, (30, 8, 8, 3), np.uint8)
    np.savez(ref, arr_0=images, mu=np.zeros(8), sigma=np.eye(8))  # statistics of no images: not to be used

    def score(*extra):
        fid.main([str(samples), str(ref), "--metrics", "fid", "--json", str(tmp_path / "r.json"), *extra])
        return json.loads((tmp_path / "r.json").read_text())
    result = score("--reference-subsample", "12")
    drawn = images[np.sort(np.random.default_rng(0).choice(30, 12, replace=False))]
    want = evaluation.evaluate(str(samples), drawn, ["fid"], cache=False, progress=False)["fid"]
    assert result["num_reference"] == 12 and result["fid"] == pytest.approx(want, rel=1e-9)
    assert (tmp_path / "ref.npz.subsample12-seed0.inception-stats.npz").is_file()
    assert score("--reference-subsample", "12", "--subsample-seed", "1")["fid"] != pytest.approx(want, rel=1e-6)
    assert score()["fid"] != pytest.approx(want, rel=1e-6) and score()["num_reference"] == 30
    capsys.readouterr()
    assert fid.cli([str(samples), str(ref), "--reference-subsample", "31"]) == 2
    assert "holds 30 images, fewer than the subsample of 31" in capsys.readouterr().err


def test_fd_classifier_is_train_pys_number_of_the_same_samples(tmp_path, capsys, monkeypatch):
    """Issue 22: fid.py computes fd_classifier, train.py's in-run metric for pixel data without Inception
    weights: feature_nets' classifier of the reference dataset (trained once and cached in --cache-dir, as
    train.py caches it in RESULTS/eval-cache), and the number evaluation.evaluate gives with it, as
    watch.Evaluation calls it. Without weights it is the default for a pixel dataset, as in train.py."""
    from data import LatentDataset, make_demo_dataset
    ref, cache = make_demo_dataset(tmp_path / "demo", num_items=200, image_size=8), tmp_path / "eval-cache"
    rng = np.random.default_rng(0)
    images = np.stack([LatentDataset(ref)[i][0].numpy().transpose(1, 2, 0) for i in range(40)])
    images = np.clip(images + rng.integers(-40, 41, images.shape), 0, 255).astype(np.uint8)
    samples = evaluation.write_npz_samples(tmp_path / "samples", images)
    out = tmp_path / "r.json"
    for env in (feature_nets.INCEPTION_ENV, feature_nets.DINOV2_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights: the default is fd_classifier
    assert fid.cli([samples, ref, "--cache-dir", str(cache), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "trained the evaluation classifier" in printed.err and "FD-classifier: " in printed.out
    got = json.loads(out.read_text())

    trained = []
    net = feature_nets.trained_classifier(LatentDataset(ref), str(cache), "cpu", trained.append)
    assert not trained  # the cached classifier, which train.py's evaluation would load too
    want = evaluation.evaluate(images, ref, ["fd_classifier"], networks={"classifier": net}, cache=False,
                               progress=False)  # the reference's statistics computed afresh, not read from fid.py's cache
    assert set(got) >= {"fd_classifier"} and "fid" not in got
    assert got["fd_classifier"] == pytest.approx(want["fd_classifier"], rel=1e-12) and got["fd_classifier"] > 0
    assert fid.cli([samples, str(tmp_path / "samples.npz"), "--metrics", "fd_classifier"]) == 2
    assert "is not a data.py pixel dataset" in capsys.readouterr().err
