"""Feature networks for evaluation.py: the 2015 TF Inception (FID, sFID, IS, precision/recall) and
DINOv2 ViT-L/14 (FD-DINOv2), loaded from local weight files, never downloaded; and the small
classifier of fd_classifier (train.py's in-run metric on pixel data without Inception weights, and
the experiments' FD), trained on the run's own data once and cached. docs/evaluation.md maps the
ADM evaluator's TF tensors to these outputs.

A feature network is any object with
    name      short, file-safe: it names cache files ("inception", "dinov2", ...)
    key       what its features depend on (architecture, weights file); part of every cache key
    outputs   {output name: feature dimension}
    __call__(batch) -> {output name: float32 tensor (B, dim)}, batch uint8 N x H x W x 3 numpy
              (the classifier also takes model-space float N x C x H x W)
"""
import hashlib
import json
import math
import os
import time
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UsageError, barrier, one_line, rank_world
from data import atomic_write
from eval_inputs import path_key
from runs import folder_lock

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE
INCEPTION_ENV = "MAPDIT_INCEPTION_WEIGHTS"
DINOV2_FILE = "dinov2_vitl14_pretrain.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + DINOV2_FILE
DINOV2_ENV = "MAPDIT_DINOV2_WEIGHTS"
WEIGHTS = {"inception": (INCEPTION_ENV, INCEPTION_FILE, INCEPTION_URL, "--inception-weights"),  # find_weights'
           "dinov2": (DINOV2_ENV, DINOV2_FILE, DINOV2_URL, "--dinov2-weights")}
DINOV2_ARCH = "vit_large_patch14_dinov2"  # timm's build of the hub model 'dinov2_vitl14'
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_weights(path, env, filename, url, flag):
    """The weights file: path, else $env, else the torch hub cache's checkpoints/filename (where
    torch.hub puts it). Raises UsageError naming where to get it; never downloads."""
    path = path or os.environ.get(env)
    if path:
        if not os.path.isfile(path):
            raise UsageError(f"{path}: weights file not found (want {filename}, from {url})")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(cached):
        raise UsageError(f"{filename} not found: download {url} to {cached}, or pass {flag} FILE "
                           f"(or set ${env})")
    return cached


def _load_weights(weights, network):
    """(path, state dict) of network's weights file (find_weights with WEIGHTS[network]); UsageError."""
    path = find_weights(weights, *WEIGHTS[network])
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise UsageError(f"{path}: does not load as a state dict ({one_line(e)})")
    if not isinstance(state, dict):
        raise UsageError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return path, dict(state)


def _frozen(net, key, device):
    """net with its cache key, in eval mode without gradients on device."""
    net.key, net.device = key, torch.device(device)
    return net.eval().requires_grad_(False).to(net.device)


def _nhwc_uint8(batch, device):
    """uint8 (B, H, W, 3) numpy or tensor -> float32 (B, 3, H, W) on device, values 0..255."""
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))  # a copy: memmaps are read-only
    return x.to(device).permute(0, 3, 1, 2).float()


def tf1_resize_matrix(in_size, out_size):
    """(out_size, in_size) weights of TF 1.x's bilinear resize (align_corners=False, no half-pixel
    centres): output i samples input position i * in_size / out_size, clamped at the last pixel."""
    pos = np.arange(out_size) * (in_size / out_size)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = pos - lo
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return torch.from_numpy(m).float()


def tf1_resize(x, size):
    """TF 1.x bilinear resize of x (B, C, H, W) to (size, size): R_h x R_w^T per channel."""
    rh = tf1_resize_matrix(x.shape[-2], size).to(x.device)
    rw = tf1_resize_matrix(x.shape[-1], size).to(x.device)
    return rh @ x @ rw.T


class InceptionNet(torch.nn.Module):
    """pytorch-fid's port of the 2015 TF Inception with the ADM evaluator's three outputs: pool
    (2048), spatial (2023) and logits (1008, unbiased). Weights: pt_inception-2015-12-05."""

    name = "inception"
    outputs = {"pool": 2048, "spatial": 2023, "logits": 1008}
    cache_features = ("pool",)  # a reference's cache keeps these features (precision/recall), not only statistics

    def __init__(self, weights=None, device="cpu"):
        super().__init__()
        path, state = _load_weights(weights, "inception")
        from pytorch_fid import inception  # a slow import: only once the weights are there
        try:
            with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
                self.net = inception.fid_inception_v3()
        except (RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"{path}: not the FID Inception weights {INCEPTION_FILE} ({one_line(e)})")
        _frozen(self, f"inception-2015-12-05/adm-tensors/{path_key(path)}", device)

    @torch.no_grad()
    def forward(self, batch):
        n = self.net
        x = tf1_resize(_nhwc_uint8(batch, self.device), 299)
        x = (x - 128) / 128
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,
                      n.Mixed_6b, n.Mixed_6c):
            x = layer(x)
        spatial = n.Mixed_6d.branch1x1(x)  # "mixed_6/conv:0"
        for layer in (n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return adm_outputs(spatial, x, n.fc.weight)


def adm_outputs(spatial_map, final_map, fc_weight):
    """The ADM evaluator's readouts: pool = the global average of final_map (B, C, h, w) ("pool_3");
    spatial = the first 7 channels of spatial_map (B, C', H, W) in H, W, C order; logits = pool times
    fc_weight (classes, C), without a bias."""
    pool = final_map.mean((2, 3))
    return {"pool": pool, "spatial": spatial_map[:, :7].permute(0, 2, 3, 1).flatten(1), "logits": pool @ fc_weight.T}


def dinov2_pos_embed(pos_embed, grid):
    """DINOv2's positional embedding (1, 1 + M * M, D) resampled to a grid x grid patch grid as the
    hub model does on the fly: bicubic without antialias, at scale (grid + 0.1) / M."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m = math.isqrt(patches.shape[1])
    patches = patches.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / m
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(cls.dtype)], 1)


class DINOv2Net(torch.nn.Module):
    """DINOv2 ViT-L/14 as EDM2's FD-DINOv2 uses it: 224 x 224 (bicubic, antialias), ImageNet mean
    and std, the output of the hub model 'dinov2_vitl14' (the CLS token after the final norm).
    Built by timm, weights from the hub checkpoint (or timm's copy of it)."""

    name = "dinov2"
    outputs = {"cls": 1024}
    image_size = 224

    def __init__(self, weights=None, device="cpu", arch=DINOV2_ARCH):
        super().__init__()
        path, state = _load_weights(weights, "dinov2")
        import timm
        self.model = timm.create_model(arch, pretrained=False, img_size=self.image_size, num_classes=0)
        self.outputs = {"cls": self.model.num_features}
        state.pop("mask_token", None)  # used in training only
        try:
            grid = self.image_size // self.model.patch_embed.patch_size[0]
            state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], grid)
            self.model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"{path}: not {arch} weights in the DINOv2 hub format ({one_line(e)})")
        _frozen(self, f"{arch}/224-bicubic-antialias/{path_key(path)}", device)

    @torch.no_grad()
    def forward(self, batch):
        x = _nhwc_uint8(batch, self.device)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return {"cls": self.model((x / 255 - mean) / std)}


def random_inception_weights(path, seed=0):
    """Write a stand-in for INCEPTION_FILE to path: the real keys and shapes, random weights (He-
    initialised convolutions, so activations neither vanish nor explode over 94 layers), float16.
    For tests and speed measurements where the real file cannot be had; returns path."""
    from pytorch_fid import inception
    shapes = {}
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda module, *a, **k: shapes.update(module.state_dict())):
        inception.fid_inception_v3()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in shapes.items():
        if k.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=gen) * (2 / v[0].numel()) ** 0.5
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=gen) / v.shape[1] ** 0.5
        state[k] = v.half() if v.is_floating_point() else v
    torch.save(state, path)
    return str(path)


#################################################################################
#                 The small classifier of fd_classifier                         #
#################################################################################

# The one recipe, for train.py's in-run fd_classifier, experiments/ and the sweep alike. In cache keys.
CLASSIFIER_ITEMS, CLASSIFIER_EPOCHS, CLASSIFIER_MIN_STEPS = 20_000, 4, 300
CLASSIFIER_RECIPE = "Adam 2e-3, cosine decay, batch 128, cross-entropy with label smoothing 0.1"


class SmallClassifier(nn.Module):
    """Three 3x3 conv stages (width, 2 width, 4 width channels; ReLU; 2x2 max-pool after the first
    two), global average pooling, a hidden linear layer of feature_dim units with ReLU (the features)
    and a linear classifier. Input: model space (N, C, H, W) with H, W >= 4; any C."""

    def __init__(self, in_channels, num_classes, width=32, feature_dim=128):
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, num_classes, epochs=CLASSIFIER_EPOCHS, min_steps=CLASSIFIER_MIN_STEPS, batch_size=128,
                     lr=2e-3, seed=0, device="cpu"):
    """A SmallClassifier trained on x (N, C, H, W) float, y (N,) int with CLASSIFIER_RECIPE for `epochs`
    epochs but at least min_steps optimiser steps (small datasets): lr * (1 + cos(pi step / total)) / 2.
    Deterministic for a seed on the CPU; returned in eval mode on `device`."""
    torch.manual_seed(seed)
    net = SmallClassifier(x.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    generator, y = torch.Generator().manual_seed(seed), torch.as_tensor(y).long()
    per_epoch = max(len(x) // batch_size, 1)
    total = max(epochs, -(-min_steps // per_epoch)) * per_epoch
    net.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=generator)
        idx = order[step % per_epoch * batch_size:][:batch_size]
        for group in opt.param_groups:  # cosine decay to 0: a stable end point in few epochs
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
        # label smoothing bounds the logits, and so the feature scale, once the data is fitted
        loss = F.cross_entropy(net(x[idx].to(device)), y[idx].to(device), label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


class ClassifierNet:
    """A SmallClassifier as a feature network: batch uint8 images (B, H, W, C), or float model-space
    inputs (B, C, H, W) (latents) -> {"features": (B, feature_dim)}; predict(batch) -> labels (B,).
    key: what its weights come from (the cache file's recipe digest)."""

    name = "classifier"

    def __init__(self, net, key):
        self.net, self.key = net.eval(), key
        self.device = next(net.parameters()).device
        self.outputs = {"features": net.config["feature_dim"]}

    def model_space(self, batch):
        x = torch.as_tensor(np.array(batch) if isinstance(batch, np.ndarray) else batch)  # memmaps are read-only
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        return x.to(self.device)

    @torch.no_grad()
    def __call__(self, batch):
        return {"features": self.net.body(self.model_space(batch))}

    @torch.no_grad()
    def predict(self, batch):
        return self.net(self.model_space(batch)).argmax(1).cpu()


def dataset_items(ds, index, seed=0):
    """(model-space x (N, C, H, W), labels (N,)) of the items `index` of a data.py dataset: pixels in
    [-1, 1]; latents drawn with eps from `seed`, so that every caller sees the same ones."""
    index = np.asarray(index, dtype=np.int64)
    raw = torch.stack([ds[int(i)][0] for i in index])
    labels = torch.as_tensor(ds.labels[index]).long()
    if ds.kind == "pixel":
        return raw.float() / 127.5 - 1, labels
    return ds.draw(raw, torch.randn(raw[:, 0].shape, generator=torch.Generator().manual_seed(seed))), labels


def trained_classifier(dataset, cache_dir, device, log, skip=0):
    """The ClassifierNet of a data.py dataset: trained with train_classifier on up to CLASSIFIER_ITEMS
    items, those after the first `skip` of a fixed permutation (seed 0; experiments hold the skipped
    ones out), and cached in cache_dir keyed by the manifest and the recipe. Rank 0 trains under the
    cache's lock, so runs sharing the cache train it once; the other ranks wait."""
    order = np.random.default_rng(0).permutation(len(dataset))[skip:][:CLASSIFIER_ITEMS]
    arch = SmallClassifier(dataset.shape[0], dataset.num_classes).config
    recipe = dict(manifest=dataset.manifest, items=len(order), skip=skip, epochs=CLASSIFIER_EPOCHS,
                  min_steps=CLASSIFIER_MIN_STEPS, recipe=CLASSIFIER_RECIPE, arch=arch)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"classifier-{digest}.pt")
    if rank_world()[0] == 0:
        with folder_lock(cache_dir, create=True):
            if not os.path.isfile(path):
                start = time.time()
                net = train_classifier(*dataset_items(dataset, order, seed=2), dataset.num_classes,
                                       min_steps=CLASSIFIER_MIN_STEPS, device=device)
                atomic_write(path, lambda f: torch.save(net.state_dict(), f))
                log(f"trained the evaluation classifier on {len(order)} items in {time.time() - start:.0f} s: {path}")
    barrier()
    net = SmallClassifier(**arch)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return ClassifierNet(net.to(device), f"SmallClassifier/{digest}")
