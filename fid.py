"""Frechet Inception Distance (FID) in the ADM evaluator's conventions, without TensorFlow.

    python fid.py samples.npz reference.npz [--batch-size 50] [--inception-weights PATH]

Each .npz holds images (arr_0: uint8 N x H x W x 3, the ADM evaluator's format) or precomputed
statistics (mu and sigma, as in ADM's reference batch VIRTUAL_imagenet128_labeled.npz; used when
present). Features are the 2048-d pool3 activations of pytorch-fid's port of the TF Inception
network, with images resized bilinearly to 299 x 299 as pytorch-fid does (TF resizes a little
differently, so scores are close to the TF evaluator's, not identical). The weights file comes
from --inception-weights, else $MAPDIT_INCEPTION_WEIGHTS, else the torch hub cache (where it is
downloaded if missing). Every failure prints one line on stderr and exits with code 2.
"""
import argparse
import functools
import os
import sys
from unittest import mock

import numpy as np
import torch
from tqdm import tqdm

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "MAPDIT_INCEPTION_WEIGHTS"


class FIDError(Exception):
    """A failure reported as one line on stderr, exit code 2."""


def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clamped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) between two
    Gaussians, in float64. tr((S1 S2)^1/2), the sum of the square roots of the eigenvalues of
    S1^1/2 S2 S1^1/2, is the sum of the singular values of S2^1/2 S1^1/2 (the square roots from
    symmetric eigendecompositions): unlike square roots of eigenvalues, singular values do not
    magnify round-off, which keeps the distance of singular covariances (N < D) at ~0, not ~1e-4."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need means (D,) and covariances (D, D) of one D, got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    tr_root = np.linalg.svd(_sqrt_psd(s2) @ _sqrt_psd(s1), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_root)


def feature_stats(features):
    """(mu, sigma) in float64 of features (N, D), numpy or torch: the mean and the unbiased
    covariance (np.cov, as pytorch-fid and the ADM evaluator use)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _check_images(images):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"need uint8 images (N, H, W, 3), got {images.dtype}{list(images.shape)}")


def compute_statistics(images, feature_fn, batch_size=50):
    """(mu, sigma) of the features of images, uint8 (N, H, W, 3), numpy or torch. feature_fn takes
    a uint8 (B, H, W, 3) torch batch on the CPU and returns (B, D) features."""
    images = torch.as_tensor(images).cpu()
    _check_images(images.numpy())
    features = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), batch_size), desc="features", disable=None):
            batch = images[i:i + batch_size]
            out = torch.as_tensor(feature_fn(batch)).float().cpu()
            features.append(out.reshape(len(batch), -1))
    return feature_stats(torch.cat(features))


def write_npz_samples(path, images):
    """Write uint8 images (N, H, W, 3) as arr_0 of an .npz (the ADM evaluator's sample format);
    return the path written (np.savez adds .npz when missing)."""
    images = np.asarray(images)
    _check_images(images)
    np.savez(path, arr_0=images)
    return path if str(path).endswith(".npz") else f"{path}.npz"


def find_inception_weights(path=None):
    """Path of the FID Inception weights: path, else $MAPDIT_INCEPTION_WEIGHTS, else the torch hub
    cache, where they are downloaded if missing."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if path:
        if not os.path.isfile(path):
            raise FIDError(f"{path}: Inception weights file ({INCEPTION_FILE}) not found")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(cached):
        from pytorch_fid.inception import FID_WEIGHTS_URL
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, cached)
        except OSError as e:
            raise FIDError(f"{INCEPTION_FILE} is not in {os.path.dirname(cached)} and could not be "
                           f"downloaded ({getattr(e, 'reason', e)}); get it from pytorch-fid's "
                           f"release 'fid_weights' and put it there, or pass --inception-weights "
                           f"PATH (or set {WEIGHTS_ENV})")
    return cached


def inception_feature_fn(weights=None, device=None):
    """A feature_fn for compute_statistics: 2048-d pool3 features of pytorch-fid's InceptionV3
    (the TF FID network) with its weights from find_inception_weights(weights)."""
    path = find_inception_weights(weights)
    from pytorch_fid import inception  # a slow import: only once the weights are there
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def load(*args, **kwargs):  # stands in for pytorch-fid's download of the same file
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        with mock.patch.object(inception, "load_state_dict_from_url", load):
            model = inception.InceptionV3([3]).eval().to(device)
    except Exception as e:  # unpickling and state dict errors come in many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FIDError(f"{path}: not the FID Inception weights {INCEPTION_FILE} ({first})")

    @torch.no_grad()
    def features(images):
        return model(images.to(device).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    return features


def load_statistics(path, get_feature_fn, batch_size=50):
    """(mu, sigma) of an .npz: its mu and sigma when present, else the statistics of its arr_0
    images under get_feature_fn(), which is called only then."""
    try:
        npz = np.load(path)
    except (OSError, ValueError) as e:
        raise FIDError(f"{path}: cannot read it ({e})")
    if not hasattr(npz, "files"):
        raise FIDError(f"{path}: not an .npz archive")
    with npz:
        if "mu" in npz.files and "sigma" in npz.files:
            return npz["mu"], npz["sigma"]
        if "arr_0" not in npz.files:
            raise FIDError(f"{path}: holds neither mu and sigma nor arr_0 images ({npz.files})")
        images = npz["arr_0"]
    try:
        return compute_statistics(images, get_feature_fn(), batch_size)
    except ValueError as e:
        raise FIDError(f"{path}: arr_0: {e}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error as one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help=".npz with arr_0 images or mu and sigma")
    parser.add_argument("reference", help=".npz with arr_0 images or mu and sigma")
    parser.add_argument("--batch-size", type=int, default=50, help="Inception batch (default 50)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help=f"the file {INCEPTION_FILE} (default: ${WEIGHTS_ENV}, then torch hub)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    get_feature_fn = functools.cache(lambda: inception_feature_fn(args.inception_weights))
    try:
        stats = [load_statistics(p, get_feature_fn, args.batch_size)
                 for p in (args.samples, args.reference)]
        fid = frechet_distance(*stats[0], *stats[1])
    except (FIDError, ValueError) as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"FID: {fid:.4f}")


if __name__ == "__main__":
    main()
