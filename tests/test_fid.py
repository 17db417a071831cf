"""Tests of fid.py: the Frechet distance against closed forms, statistics, the feature pipeline with
a tiny stand-in network, the Inception loading path with stand-in weights, and the CLI."""
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

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
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_non_commuting():
    rng = np.random.default_rng(1)
    # 2 x 2: the eigenvalues l1, l2 of S1 S2 give tr((S1 S2)^1/2) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1, s2 = random_spd(rng, 2), random_spd(rng, 2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
    tr_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    # 6 x 6: against the eigenvalues of the non-symmetric product S2 S1, a second route.
    s1, s2 = random_spd(rng, 6), random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    tr_root = np.sqrt(np.linalg.eigvals(s2 @ s1).real).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)


def test_frechet_distance_singular_covariance_and_bad_shapes():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(10, 32))  # fewer samples than dimensions: a rank-9 covariance
    mu, sigma = fid.feature_stats(features)
    assert sigma.dtype == np.float64 and sigma.shape == (32, 32)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    with pytest.raises(ValueError):
        fid.frechet_distance(mu, sigma, mu[:5], sigma[:5, :5])


def test_statistics_of_gaussian_samples_approach_the_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 1.5])
    s1, s2 = random_spd(rng, 4), random_spd(rng, 4)
    n = 200_000
    x1 = rng.multivariate_normal(mu1, s1, n)
    x2 = torch.from_numpy(rng.multivariate_normal(mu2, s2, n))  # torch input works too
    m1, c1 = fid.feature_stats(x1)
    m2, c2 = fid.feature_stats(x2)
    np.testing.assert_allclose(m1, mu1, atol=0.03)
    np.testing.assert_allclose(c1, s1, atol=0.05 * np.abs(s1).max())
    want = fid.frechet_distance(mu1, s1, mu2, s2)
    assert fid.frechet_distance(m1, c1, m2, c2) == pytest.approx(want, rel=0.02)


def tiny_feature_fn():
    """A random conv network standing in for Inception: uint8 NHWC -> (B, 16) features."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    return lambda images: net(images.permute(0, 3, 1, 2).float() / 127.5 - 1)


def test_compute_statistics_with_a_small_feature_network(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    feature_fn = tiny_feature_fn()
    mu, sigma = fid.compute_statistics(images, feature_fn, batch_size=7)
    mu2, sigma2 = fid.compute_statistics(torch.from_numpy(images), feature_fn, batch_size=40)
    assert mu.shape == (16,) and sigma.shape == (16, 16)
    np.testing.assert_allclose(mu, mu2, rtol=1e-5, atol=1e-7)  # batching does not matter
    assert abs(fid.frechet_distance(mu, sigma, mu2, sigma2)) < 1e-6
    darker = fid.compute_statistics(images // 2, feature_fn)
    assert fid.frechet_distance(mu, sigma, *darker) > 1e-3
    with pytest.raises(ValueError):
        fid.compute_statistics(images.astype(np.float32), feature_fn)
    # the .npz route: images written in the ADM format are read back and measured alike
    path = fid.write_npz_samples(tmp_path / "samples", images)
    assert path.endswith(".npz") and np.load(path).files == ["arr_0"]
    mu3, sigma3 = fid.load_statistics(path, lambda: feature_fn)
    np.testing.assert_allclose(mu3, mu, rtol=1e-5, atol=1e-7)


def test_inception_feature_fn_with_stand_in_weights(tmp_path):
    """pytorch-fid's network loads a weights file given by path (random stand-in weights with the
    real keys and shapes, captured from an untrained build) and yields 2048-d features."""
    from pytorch_fid import inception
    captured = {}

    def capture(module, state_dict, *args, **kwargs):
        captured.update({k: v.half() for k, v in module.state_dict().items()})

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", capture):
        inception.InceptionV3([3])
    weights = tmp_path / fid.INCEPTION_FILE
    torch.save(captured, weights)
    features = fid.inception_feature_fn(str(weights), device="cpu")
    out = features(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    torch.save({"not": torch.zeros(1)}, weights)
    with pytest.raises(fid.FIDError, match="not the FID Inception weights"):
        fid.inception_feature_fn(str(weights), device="cpu")


def test_cli(tmp_path, capsys):
    rng = np.random.default_rng(5)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b, images, other = (str(tmp_path / f) for f in ("a.npz", "b.npz", "images.npz", "other.npz"))
    np.savez(a, mu=mu1, sigma=s1)
    np.savez(b, mu=mu2, sigma=s2, arr_0=np.zeros((2, 8, 8, 3), np.uint8))  # mu, sigma win
    fid.write_npz_samples(images, rng.integers(0, 256, (4, 8, 8, 3), np.uint8))
    np.savez(other, x=np.zeros(3))
    home = tmp_path / "home"  # an empty torch hub cache, and no internet (a dead proxy)
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", fid.WEIGHTS_ENV.lower())}
    env.update(HOME=str(home), TORCH_HOME=str(home / "torch"), XDG_CACHE_HOME=str(home / "cache"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    procs = [subprocess.Popen([sys.executable, "fid.py", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for args in ([a, b], [images, b])]  # at once: each python start-up takes seconds
    (code, out, err), (code2, out2, err2) = [(p.wait(timeout=120), p.stdout.read(),
                                              p.stderr.read()) for p in procs]
    assert code == 0 and err == ""
    assert out.strip() == f"FID: {fid.frechet_distance(mu1, s1, mu2, s2):.4f}"
    assert code2 == 2 and out2 == "" and len(err2.strip().splitlines()) == 1, err2
    assert fid.INCEPTION_FILE in err2 and "--inception-weights" in err2
    # the other failures, in this process: one line on stderr, exit code 2
    for args, needle in [([a, other], "neither mu and sigma"), ([a], "required"),
                         ([images, a, "--inception-weights", "/nope"], "/nope: Inception weights"),
                         ([a, str(tmp_path / "missing.npz")], "missing.npz: cannot read")]:
        with pytest.raises(SystemExit) as exit_info:
            fid.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert needle in err
