"""Offline metrics for experiments/ablate.py: no download, nothing outside this repository.

Every number names the feature network it comes from:

- FD-<data>-classifier: the Frechet distance between the 128-d penultimate-layer features of
  SmallClassifier, a small conv net that ablate.py trains on the dataset itself (once per dataset),
  for generated samples against held-out real images. Comparable only within one dataset and one
  classifier (ablate.py caches it, so a grid and its reruns share it).
- FID-Inception: the standard FID (pool_3 features of the 2015 TF Inception, evaluation.py and
  feature_nets.py) when its weights file is already on disk; never downloaded, "n/a" without it.
- Class-consistency accuracy: the fraction of the samples generated for class k that the
  classifier labels k (for real held-out images: the classifier's own accuracy).
- Held-out loss: the training loss (MSE + VB, DiT's hybrid loss) of a model on a fixed batch with
  fixed timesteps and fixed noise, so that every configuration is scored on the same terms.

Features come from evaluation.extract_features (the classifier is one more feature network,
ClassifierFeatures); the Frechet distance is evaluation.frechet_distance of evaluation.feature_stats.
"""
import numpy as np
import torch

import evaluation
import feature_nets
from cli import UsageError

from feature_nets import CLASSIFIER_RECIPE, SmallClassifier, train_classifier  # noqa: F401  (one recipe)

FEATURE_DIM = 128


class ClassifierFeatures:
    """A SmallClassifier as an evaluation feature network: model-space batches (B, C, H, W) ->
    {"features": (B, feature_dim)} on the classifier's device."""

    name, key = "classifier", "SmallClassifier"

    def __init__(self, net):
        self.net = net
        self.device = next(net.parameters()).device
        self.outputs = {"features": net.config["feature_dim"] if hasattr(net, "config") else None}

    @torch.no_grad()
    def __call__(self, x):
        return {"features": self.net.body(torch.as_tensor(x).to(self.device))}


def extract_features(net, x, batch_size=500):
    """Penultimate-layer features (N, feature_dim) of model-space inputs x, float64 numpy."""
    features = evaluation.extract_features(ClassifierFeatures(net), x, batch_size=batch_size, progress=False)
    return features["features"].astype(np.float64)


@torch.no_grad()
def _batched(fn, x, batch_size, device):
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def predict(net, x, batch_size=500):
    device = next(net.parameters()).device
    return _batched(net, x, batch_size, device).argmax(1)


def class_consistency(net, x, labels, batch_size=500):
    """Fraction of x whose predicted class is its label: the accuracy on real data, or for samples
    generated for given classes the fraction the classifier agrees with."""
    labels = torch.as_tensor(labels).long().cpu()
    return float((predict(net, x, batch_size) == labels).float().mean())


def frechet_from_features(features_a, features_b):
    """The Frechet distance between Gaussians fitted to two feature sets (N, D), in float64."""
    return evaluation.frechet_distance(*evaluation.feature_stats(features_a), *evaluation.feature_stats(features_b))


def frechet_to_stats(features, stats):
    """The Frechet distance between the Gaussian of features (N, D) and reference (mu, sigma)."""
    return evaluation.frechet_distance(*evaluation.feature_stats(features), *stats)


def inception_network(path=None, device="cpu"):
    """(Inception feature network, None) if its weights are on disk (path, else
    $MAPDIT_INCEPTION_WEIGHTS, else the torch hub cache), else (None, reason). Never downloads."""
    try:
        return feature_nets.InceptionNet(path, device), None
    except UsageError as e:
        return None, str(e)


def inception_stats(network, images_nchw_uint8, batch_size=50):
    """(mu, sigma) of the pool_3 features of uint8 images (N, 3, H, W)."""
    images = torch.as_tensor(images_nchw_uint8).permute(0, 2, 3, 1).contiguous().numpy()
    features = evaluation.extract_features(network, images, batch_size=batch_size, progress=False)
    return evaluation.feature_stats(features["pool"])


@torch.no_grad()
def heldout_loss(model, diffusion, x, y, seed=0, batch_size=256):
    """Mean loss, mse and vb of `model` (in eval mode: no label dropout) on x (N, C, H, W) in model
    space with labels y: timesteps evenly spread over [0, T), noise from a generator seeded with
    `seed`, so every model is scored on the same (x, t, noise)."""
    device = next(model.parameters()).device
    n, steps = len(x), diffusion.num_timesteps
    t_all = torch.arange(n) * steps // n
    noise_all = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    totals = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        terms = diffusion.training_losses(model, x[sl].to(device), t_all[sl].to(device),
                                          dict(y=torch.as_tensor(y[sl]).to(device)), noise=noise_all[sl].to(device))
        for k in totals:
            totals[k] += terms[k].double().sum().item()
    return {k: v / n for k, v in totals.items()}
