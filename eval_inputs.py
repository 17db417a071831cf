"""The inputs of evaluation.py: samples and references as image sources (arrays, .npz files read
memory-mapped, image folders, data.py pixel datasets) or precomputed statistics, with the cache key
of what is on disk.

An image source has len() and [i:j] -> uint8 (B, H, W, 3) numpy; Side wraps one side of a comparison.
"""
import hashlib
import os
import struct
import zipfile

import numpy as np
import torch
from PIL import Image

from cli import UsageError, one_line

ADM_STATS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}  # precomputed in ADM's ref batches
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")


def _npz_array(path, name="arr_0"):
    """Array `name` of an .npz, memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with z.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{name}.npy: bad local header")
        f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30])))
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if offset + int(np.prod(shape)) * dtype.itemsize > os.path.getsize(path):
        raise ValueError(f"{name}.npy is cut short")
    return np.memmap(path, dtype, "r", offset=offset, shape=shape, order="F" if fortran else "C")


def image_files(folder):
    """The image files under folder (recursively, links followed), sorted by path."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder, followlinks=True) for f in fs
                  if f.lower().endswith(IMAGE_EXTENSIONS))


class Images:
    """n images as an image source: [i:j] -> uint8 (B, H, W, 3), image k being load(k) of image_shape;
    shape (n, *image_shape) as an array's."""

    def __init__(self, load, n, image_shape):
        self.load, self.shape = load, (n, *image_shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        return np.stack([self.load(k) for k in range(len(self))[index]])


def image_folder(path):
    """The images under a folder (recursively, sorted by path); UsageError for an unreadable one or
    one of another size than the first."""
    files = image_files(path)
    if not files:
        raise UsageError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")

    def load(k):
        try:
            with Image.open(files[k]) as im:
                image = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UsageError(f"{files[k]}: unreadable image ({e})")
        if k and image.shape != first.shape:
            raise UsageError(f"{files[k]}: {image.shape[1]}x{image.shape[0]} pixels, but {files[0]} is "
                             f"{first.shape[1]}x{first.shape[0]}; give images of one size")
        return image
    first = load(0)
    return Images(load, len(files), first.shape)


def pixel_dataset(path):
    """A data.py pixel dataset (3 channels) as an image source."""
    from data import LatentDataset
    ds = LatentDataset(path)
    if ds.kind != "pixel" or ds.shape[0] != 3:
        raise UsageError(f"{path}: a {ds.kind} dataset of shape {list(ds.shape)}; evaluation "
                         f"needs RGB pixel data (decode latent samples with sample.py --fid)")
    return Images(lambda k: ds[k][0].numpy().transpose(1, 2, 0), len(ds), (*ds.shape[1:], 3))


def random_subset(images, n, seed):
    """n images of an image source, drawn without replacement by numpy's generator of seed, in their order."""
    index = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return Images(lambda k: images[index[k]:index[k] + 1][0], n, images.shape[1:])


def path_key(path):
    """What a file or folder holds, cheaply: its real path and the sizes and modification times of
    its files (a changed, added or removed file changes the key)."""
    path = os.path.realpath(path)
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    h = hashlib.sha256(path.encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def array_key(images):
    """What an in-memory image array holds: a sha256 of its dtype, shape and bytes (read in slices)."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    for i in range(0, len(a), 1000):
        h.update(np.ascontiguousarray(a[i:i + 1000]).data)
    return h.hexdigest()


def check_images(images, what):
    """UsageError unless images are uint8 (N, H, W, 3) with N >= 2."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 2 or getattr(images, "dtype", None) != np.uint8:
        got = f"{getattr(images, 'dtype', type(images).__name__)}{list(shape)}"
        raise UsageError(f"{what}: need uint8 images N x H x W x 3 with N >= 2 (the ADM format), got {got}")


def check_stats(mu, sigma, what, fix="compute them again"):
    """UsageError unless mu (D,) and sigma (D, D) are finite: Frechet statistics."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UsageError(f"{what}: need a mean (D,) and a covariance (D, D), got shapes {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{what} hold non-finite values (NaN or inf); {fix}")


class Side:
    """One side of a comparison: images (an array-like of uint8 N x H x W x 3 batches, or None),
    precomputed statistics {metric: (mu, sigma)}, a cache key (None: never cached) and a label.
    subsample (n, seed): n of its images drawn at random (random_subset), without the precomputed
    statistics of them all; tag names them in cache files."""

    def __init__(self, source, what, subsample=None):
        self.label, self.images, self.stats, self.key, self.path, self.tag = what, None, {}, None, None, ""
        if isinstance(source, dict):
            self.stats = {m: tuple(np.asarray(v, np.float64) for v in s) for m, s in source.items()}
        elif isinstance(source, (np.ndarray, torch.Tensor)):  # checked by the network that reads it
            self.images = source.cpu().numpy() if isinstance(source, torch.Tensor) and source.dtype == torch.uint8 \
                else source
        else:
            self._open(os.fspath(source))
            self.key = path_key(self.path)
        if self.images is None and not self.stats:
            raise UsageError(f"{self.label}: holds neither images nor statistics")
        if subsample:
            n, seed = subsample
            if len(self) < n:
                raise UsageError(f"{self.label}: holds {len(self)} images, fewer than the subsample of {n} asked for")
            self.images, self.stats, self.tag = random_subset(self.images, n, seed), {}, f".subsample{n}-seed{seed}"
            self.key = self.key and self.key + self.tag
        for metric, (mu, sigma) in self.stats.items():
            check_stats(mu, sigma, f"{self.label}: its {metric} statistics")
        if self.images is not None and len(self.images) < 2:
            raise UsageError(f"{self.label}: holds {len(self.images)} image; statistics need 2 or more")

    def _open(self, path):
        self.label, self.path = path, path
        if os.path.isdir(path):
            self.images = pixel_dataset(path) if os.path.isfile(os.path.join(path, "manifest.json")) else image_folder(path)
            return
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file or folder")
        try:
            with np.load(path) as npz:
                names = list(npz.files)
                for metric, (m, s) in ADM_STATS.items():
                    if m in names and s in names:
                        self.stats[metric] = (npz[m].astype(np.float64), npz[s].astype(np.float64))
            if "arr_0" in names:
                self.images = _npz_array(path)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
            raise UsageError(f"{path}: not a readable .npz ({one_line(e)}); truncated? write it again")
        if self.images is None and not self.stats:
            held = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            raise UsageError(f"{path}: holds neither arr_0 images nor mu and sigma (it holds {held or 'nothing'})")
        if self.images is not None:
            check_images(self.images, f"{path}: arr_0")

    @property
    def image_shape(self):
        return None if self.images is None else tuple(self.images.shape[1:])

    def __len__(self):
        return 0 if self.images is None else len(self.images)
