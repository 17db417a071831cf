"""Sharded datasets for MaP-DiT: latent ImageNet (SD-VAE posteriors) and small pixel datasets.

A dataset is a directory:

    manifest.json           {"format": "map-dit", "version": 1, "kind": "latent" | "pixel",
                             "shape": [C, H, W], "num_classes": K, "num_items": N,
                             "shards": [{"name": "shard-00000", "count": n}, ...],
                             "vae": "stabilityai/sd-vae-ft-ema" or null (pixel), "image_size": 128,
                             "channel_mean": [C floats] or null, "channel_std": [C floats] or null,
                             "class_names": [...] or null, "source": "...", "skipped": 0,
                             ...extra keys allowed}
    shard-00000.labels.npy  (n,) int64
    shard-00000.mean.npy    (n, C, H, W) float16   latent only: VAE posterior mean
    shard-00000.std.npy     (n, C, H, W) float16   latent only: VAE posterior std
    shard-00000.images.npy  (n, C, H, W) uint8     pixel only

Every file is written under a temporary name and renamed into place, a shard's labels file last, so
a shard is complete iff its labels file exists and an interrupted writer can resume. For latent
data, channel_mean / channel_std are the per-channel mean and std of the posterior samples
z = mean + std * eps over all items and pixels (LatentDataset.draw normalises with them). Shards are
memory-mapped, opened lazily in each (worker) process.
"""
import colorsys
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw

from cli import ArgumentParser, UsageError, barrier, rank_world, run_command

FORMAT, VERSION = "map-dit", 1
DTYPES = {"labels": np.int64, "mean": np.float16, "std": np.float16, "images": np.uint8}
ARRAYS = {"latent": ("mean", "std"), "pixel": ("images",)}
REQUIRED = ("kind", "shape", "num_classes", "num_items", "shards")
LABELS_FILE = re.compile(r"shard-(\d+)\.labels\.npy")


def shard_file(directory, name, array):
    return os.path.join(directory, f"{name}.{array}.npy")


def atomic_write(path, write):
    """Call write(f) on a temporary file of this process next to path, fsync it, then rename it to
    path: path is the old file or the complete new one. A failed write (a full disk: an OSError, or the
    RuntimeError of torch's zip writer) leaves no temporary file and raises UsageError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:  # how torch's zip writer reports a full disk
                raise OSError((str(e).strip().splitlines() or [type(e).__name__])[-1][:200]) from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UsageError(f"{path}: cannot write ({e.strerror or e}); nothing was replaced and finished work (chunks, "
                         f"shards, checkpoints) is intact: free space (or fix the permissions) and rerun the same "
                         f"command to continue") from None


def write_text(path, text):
    """text to path, atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, obj, indent=1):
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path):
    """The JSON value in the file at path; None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class ChunkFolder:
    """Resumable work in a folder that the ranks of torchrun share: settings.json records the settings
    its chunks are made with, and chunk k (an int: NNNNNN.npz, or a name: NAME.npz) is written
    atomically once finished, so a rerun with the same settings makes only the chunks not there.
    A rerun with other settings (those settings.json records that differ) is refused, UsageError
    naming them and `flag`; with replace=True it starts afresh instead (every file there goes).
    Rank r of W makes the chunks cli.my_chunks(count): k = r, r + W, ... Used by sample.py --fid, the
    feature extraction of evaluation.py and download.py imagenet (its shards are data.py's)."""

    def __init__(self, folder, settings, replace=False, flag="--out"):
        self.folder, file = str(folder), os.path.join(folder, "settings.json")
        settings = json.loads(json.dumps(settings))  # as it reads back (tuples are lists)
        os.makedirs(self.folder, exist_ok=True)
        recorded, first = read_json(file), rank_world()[0] == 0
        if first and replace and (recorded is None or _changed(recorded, settings)):
            for name in os.listdir(self.folder):
                os.remove(os.path.join(self.folder, name))
            recorded = None
        if recorded is None and (first or not replace):  # ranks alike: the same file
            write_json(file, settings)
        barrier()
        changed = _changed(read_json(file) or {}, settings)
        if changed:
            raise UsageError(f"{self.folder}: holds chunks made with other {', '.join(changed)} (see settings.json); "
                             f"use the same options to resume, or another {flag}")

    def path(self, k):
        return os.path.join(self.folder, f"{k:06d}.npz" if isinstance(k, int) else f"{k}.npz")

    def done(self, k):
        return os.path.exists(self.path(k))

    def save(self, k, **arrays):
        atomic_write(self.path(k), lambda f: np.savez(f, **arrays))

    def load(self, k):
        """{name: array} of chunk k; UsageError naming a corrupt file."""
        try:
            with np.load(self.path(k)) as z:
                return {name: z[name] for name in z.files}
        except Exception as e:  # a truncated or foreign file fails in many ways (zip, pickle, key errors)
            raise UsageError(f"{self.path(k)}: corrupt chunk file ({type(e).__name__}); delete it and rerun the "
                             f"same command to make it again") from None


def _changed(recorded, settings):
    """The recorded settings that differ (settings added since they were recorded do not count)."""
    return sorted(k for k, v in recorded.items() if settings.get(k) != v)


class ShardWriter:
    """Writes a dataset shard by shard. To resume, skip the indices for which shard_done() is true."""

    def __init__(self, out_dir, kind, shape, num_classes, shard_size=10000):
        if kind not in ARRAYS or len(shape) != 3:
            raise UsageError(f"{out_dir}: need kind 'latent' or 'pixel' and shape (C, H, W), "
                            f"got {kind!r}, {tuple(shape)}")
        self.out_dir, self.kind = str(out_dir), kind
        self.shape, self.num_classes = tuple(int(s) for s in shape), int(num_classes)
        self.shard_size = int(shard_size)
        os.makedirs(self.out_dir, exist_ok=True)

    def _file(self, index, array):
        return shard_file(self.out_dir, f"shard-{index:05d}", array)

    def shard_done(self, index):
        return os.path.exists(self._file(index, "labels"))

    def write_shard(self, index, labels, mean=None, std=None, images=None):
        labels, given = np.asarray(labels), {"mean": mean, "std": std, "images": images}
        file = self._file(index, "labels")
        if labels.ndim != 1 or len(labels) == 0 or labels.dtype.kind not in "iu":
            raise UsageError(f"{file}: labels must be a non-empty 1-d integer array, "
                            f"got {labels.dtype}{list(labels.shape)}")
        _check_labels(labels, self.num_classes, file, "labels must lie in [0, num_classes)")
        arrays, want = {}, (len(labels), *self.shape)
        for name in ARRAYS[self.kind]:
            a = given.pop(name)
            a = a if a is None else np.asarray(a)
            if a is None or a.shape != want or not np.can_cast(a.dtype, DTYPES[name], "same_kind"):
                got = a if a is None else f"{a.dtype}{list(a.shape)}"
                raise UsageError(f"{self._file(index, name)}: need {name} of shape {list(want)} "
                                f"castable to {np.dtype(DTYPES[name])}, got {got}")
            arrays[name] = a.astype(DTYPES[name])
        if any(a is not None for a in given.values()):
            raise UsageError(f"{file}: {self.kind} shards take only {ARRAYS[self.kind]}")
        if self.shard_done(index):
            os.remove(file)  # the shard is incomplete while it is being overwritten
        for name, a in [*arrays.items(), ("labels", labels.astype(np.int64))]:
            atomic_write(self._file(index, name), lambda f: np.save(f, a))

    def finish(self, **manifest_extra):
        """Write manifest.json over the completed shards 0..n-1 and return it as a dict."""
        reserved = set(manifest_extra) & {"format", "version", *REQUIRED}
        if reserved:
            raise UsageError(f"{self.out_dir}: finish() sets {sorted(reserved)} itself")
        found = {int(m[1]) for f in os.listdir(self.out_dir) if (m := LABELS_FILE.fullmatch(f))}
        if not found:
            raise UsageError(f"{self.out_dir}: empty dataset, no complete shard; write_shard() first")
        missing = sorted(set(range(max(found) + 1)) - found)
        if missing:
            raise UsageError(f"{self._file(missing[0], 'labels')}: missing while later shards exist; "
                            f"write shard {missing[0]} (resume the writer), then finish()")
        counts = [len(np.load(self._file(i, "labels"), mmap_mode="r")) for i in range(len(found))]
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "shape": list(self.shape),
                    "num_classes": self.num_classes, "num_items": sum(counts),
                    "shards": [{"name": f"shard-{i:05d}", "count": c} for i, c in enumerate(counts)],
                    "vae": None, "image_size": self.shape[-1] if self.kind == "pixel" else None,
                    "channel_mean": None, "channel_std": None, "class_names": None,
                    "source": None, "skipped": 0, **manifest_extra}
        if self.kind == "latent" and None in (manifest["channel_mean"], manifest["channel_std"]):
            manifest["channel_mean"], manifest["channel_std"] = self._channel_stats(len(counts))
        write_json(os.path.join(self.out_dir, "manifest.json"), manifest)
        return manifest

    def _channel_stats(self, num_shards, chunk=1024):
        """Per-channel mean and sqrt(Var[mean] + E[std^2]) over items and pixels, streamed in float64."""
        sums, count = np.zeros((3, self.shape[0])), 0  # rows: sum m, sum m^2, sum s^2
        for i in range(num_shards):
            mean, std = (np.load(self._file(i, a), mmap_mode="r") for a in ("mean", "std"))
            for j in range(0, len(mean), chunk):
                m, s = (np.asarray(a[j:j + chunk], np.float64) for a in (mean, std))
                sums += [m.sum((0, 2, 3)), (m * m).sum((0, 2, 3)), (s * s).sum((0, 2, 3))]
                count += m.size // self.shape[0]
        mu = sums[0] / count
        return mu.tolist(), np.sqrt(sums[1] / count - mu ** 2 + sums[2] / count).tolist()


def _check_labels(labels, num_classes, file, fix):
    """labels, or UsageError when one lies outside [0, num_classes)."""
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UsageError(f"{file}: labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes}); {fix}")
    return labels


def read_manifest(path):
    """Load and check the manifest.json of the dataset directory path; raises UsageError."""
    file = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise UsageError(f"{path}: dataset directory not found; fix the path or create the dataset")
    if not os.path.isfile(file):
        raise UsageError(f"{file}: missing; the writer did not finish (run ShardWriter.finish())")
    m = read_json(file)
    if m is None:
        raise UsageError(f"{file}: malformed JSON; rewrite it with ShardWriter.finish()")
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        got = (m.get("format"), m.get("version")) if isinstance(m, dict) else type(m).__name__
        raise UsageError(f"{file}: not a {FORMAT} version {VERSION} manifest (got {got})")
    missing = [k for k in REQUIRED if k not in m]
    if missing or not isinstance(m["kind"], str) or m["kind"] not in ARRAYS:
        raise UsageError(f"{file}: missing keys {missing} or unknown kind {m.get('kind')!r} "
                        f"(need \"latent\" or \"pixel\")")
    try:
        shape, num_classes = [int(s) for s in m["shape"]], int(m["num_classes"])
        counts = [int(s["count"]) for s in m["shards"]]
        names_ok = all(isinstance(s["name"], str) for s in m["shards"])
        stats = [float(v) for k in ("channel_mean", "channel_std") for v in m.get(k) or []]
    except (TypeError, KeyError, ValueError) as e:
        raise UsageError(f"{file}: malformed shape, num_classes, shards or channel statistics "
                        f"({e!r})") from None
    if len(shape) != 3 or min(shape) < 1 or num_classes < 1 or min(counts, default=1) < 1 \
            or not names_ok:
        raise UsageError(f"{file}: need shape [C, H, W], num_classes >= 1 and a name and a positive "
                        f"count for each shard")
    outside = [s["name"] for s in m["shards"] if not is_plain_name(s["name"])]
    if outside:
        raise UsageError(f"{file}: shard name {outside[0]!r} is not a plain file name in the dataset "
                        f"directory (no '/', '..' or absolute paths); fix manifest.json")
    if m["kind"] == "latent" and (len(stats) != 2 * shape[0] or min(stats[shape[0]:]) <= 0):
        raise UsageError(f"{file}: latent data needs channel_mean and channel_std (> 0), "
                        f"{shape[0]} numbers each; recompute them with ShardWriter.finish()")
    if sum(counts) == 0 or sum(counts) != m["num_items"]:
        raise UsageError(f"{file}: empty dataset or num_items ({m['num_items']}) differs from the "
                        f"sum of shard counts ({sum(counts)})")
    return m


def is_plain_name(name):
    """A file name inside the directory: no separator, not '', '.' or '..'."""
    return name not in ("", ".", "..") and os.path.basename(name) == name and not (os.altsep and os.altsep in name)


def denormalize(x, manifest):
    """Model space -> data space: VAE latents x * channel_std + channel_mean, or uint8 images."""
    if manifest["kind"] == "pixel":
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    mean, std = (torch.tensor(manifest[k], dtype=x.dtype, device=x.device).view(-1, 1, 1)
                 for k in ("channel_mean", "channel_std"))
    return x * std + mean


@torch.no_grad()
def decode(x, manifest, vae):
    """Model space (N, C, h, w) -> uint8 images (N, H, W, 3), numpy: the VAE (fp32) for latent runs."""
    images = denormalize(x, manifest)
    if manifest["kind"] == "latent":
        images = ((vae.decode(images).sample + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class LatentDataset(torch.utils.data.Dataset):
    """The items of a dataset directory: raw arrays and labels; `draw` maps a batch to model space."""

    def __init__(self, path, hflip=False):
        self.path, self.hflip = str(path), hflip
        self.manifest = read_manifest(self.path)
        self.kind, self.shape = self.manifest["kind"], tuple(self.manifest["shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self._names = [s["name"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.labels = np.concatenate([self._check_shard(n, c) for n, c in zip(self._names, counts)])
        self._starts = np.cumsum([0] + counts)[:-1]
        if self.kind == "latent":
            self._mean, self._std = (torch.tensor(self.manifest[k], dtype=torch.float32).view(-1, 1, 1)
                                     for k in ("channel_mean", "channel_std"))
        self._pid, self._open = None, {}

    def _check_shard(self, name, count):
        """Check a shard's array headers against the manifest and its label range; return labels."""
        for array in ("labels", *ARRAYS[self.kind]):
            file = shard_file(self.path, name, array)
            if not os.path.isfile(file):
                raise UsageError(f"{file}: missing shard file; rerun the writer (it resumes) "
                                f"or fix manifest.json")
            try:
                a = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise UsageError(f"{file}: unreadable .npy ({e}); rewrite this shard") from None
            want = (count,) if array == "labels" else (count, *self.shape)
            if a.shape != want or a.dtype != DTYPES[array]:
                raise UsageError(f"{file}: holds {a.dtype}{list(a.shape)} but manifest.json says "
                                f"{np.dtype(DTYPES[array])}{list(want)}; rewrite the shard or fix "
                                f"manifest.json")
            if array == "labels":
                labels = _check_labels(np.array(a), self.num_classes, file, "fix them or num_classes in manifest.json")
        return labels

    def __len__(self):
        return len(self.labels)

    def _arrays(self, shard):
        if self._pid != os.getpid():  # mmaps are opened per process: DataLoader workers fork
            self._pid, self._open = os.getpid(), {}
        if shard not in self._open:
            self._open[shard] = [np.load(shard_file(self.path, self._names[shard], a), mmap_mode="r")
                                 for a in ARRAYS[self.kind]]
        return self._open[shard]

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_open": {}}

    def __getitem__(self, i):
        """(raw, label): raw is float32 (2, C, H, W) = [posterior mean, posterior std] for latent
        data, uint8 (C, H, W) for pixel data. `draw` turns a batch of them into model input."""
        i = range(len(self))[i]  # IndexError past the end, negative indices count from it
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        arrays = [torch.from_numpy(np.array(a[i - self._starts[shard]])) for a in self._arrays(shard)]
        if self.kind == "latent" and not all(torch.isfinite(a).all() for a in arrays):
            file = shard_file(self.path, self._names[shard], "mean")
            raise UsageError(f"{file}: item {i - self._starts[shard]} holds NaN or inf (in its mean or std); "
                            f"re-encode the shard (`python data.py verify {self.path}` lists every bad one)")
        raw = torch.stack(arrays).float() if self.kind == "latent" else arrays[0]
        return raw, int(self.labels[i])

    def draw(self, raw, eps=None, flip=None):
        """A batch of raw items (N, ...) on any device -> model space (N, C, H, W).

        Latent: z = mean + std * eps with a fresh eps ~ N(0, 1), then (z - channel_mean) / channel_std.
        Pixel: images / 127.5 - 1. With hflip each item is mirrored with probability 1/2. The
        trainer passes eps (N, C, H, W) and flip (N,) bool from its own generator so that runs are
        reproducible and resumable; by default they come from torch's global RNG."""
        if self.kind == "latent":
            mean, std = raw.unbind(1)
            eps = torch.randn_like(mean) if eps is None else eps
            x = (mean + std * eps - self._mean.to(raw.device)) / self._std.to(raw.device)
        else:
            x = raw.float() / 127.5 - 1
        if self.hflip:
            flip = torch.rand(len(x), device=x.device) < 0.5 if flip is None else flip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x


demo_class_names = ("circle", "square", "triangle", "plus", "ring", "star",
                    "horizontal bars", "vertical bars", "diamond", "heart")
_DEMO_COLOURS = ((235, 40, 40), (255, 140, 0), (240, 225, 30), (40, 200, 60), (0, 205, 235),
                 (50, 90, 255), (150, 60, 235), (225, 45, 200), (235, 235, 235), (255, 160, 190))
DEMO_VARIANTS = ("colours", "shapes")  # class = shape and colour | class = shape alone


def _ngon(n, radius=1.0, start=-np.pi / 2):
    a = start + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], 1)


def _demo_shapes():
    """Per class, (polygon, is_hole) pairs in a unit disc, y pointing down."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -13 * np.cos(t) + 5 * np.cos(2 * t) + 2 * np.cos(3 * t) + np.cos(4 * t)], 1)
    heart -= (heart.max(0) + heart.min(0)) / 2
    heart /= np.linalg.norm(heart, axis=1).max()
    arm = [(0.3, 1), (0.3, 0.3), (1, 0.3), (1, -0.3), (0.3, -0.3), (0.3, -1)]
    plus = 0.93 * np.array(arm + [(-x, -y) for x, y in arm])
    star = _ngon(10) * np.where(np.arange(10) % 2, 0.42, 1.0)[:, None]
    bars = [np.array([[-0.7, y - 0.17], [0.7, y - 0.17], [0.7, y + 0.17], [-0.7, y + 0.17]]) for y in (-0.55, 0.0, 0.55)]
    diamond = np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]])
    solids = [[_ngon(48, 0.85)], [_ngon(4, 1.0, np.pi / 4)], [_ngon(3)], [plus], None, [star], bars,
              [b[:, ::-1] for b in bars], [diamond], [heart]]
    ring = [(_ngon(48, 0.95), False), (_ngon(48, 0.55), True)]
    return [ring if s is None else [(p, False) for p in s] for s in solids]


_DEMO_SHAPES = _demo_shapes()


def _render_demo(label, rng, image_size, variant="colours", scale=4):
    """One demo image, (size, size, 3) uint8: drawn at scale x the size, then averaged down. "colours":
    the class's colour, jittered; "shapes": any bright colour, wider sizes and rotations. Rotations stay
    within +-30 degrees, so horizontal and vertical bars remain two classes."""
    size = image_size * scale
    radius, turn = ((0.28, 0.42), 0.35) if variant == "colours" else ((0.22, 0.45), np.pi / 6)
    r = rng.uniform(*radius) * size
    (cx, cy), angle = rng.uniform(r, size - r, 2), rng.uniform(-turn, turn)
    c, s = np.cos(angle), np.sin(angle)
    if variant == "colours":
        colour = tuple(np.clip(np.add(_DEMO_COLOURS[label], rng.integers(-25, 26, 3)), 0, 255).tolist())
    else:
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.4, 1), rng.uniform(0.7, 1))
        colour = tuple(round(255 * v) for v in rgb)
    background = (int(rng.integers(0, 35)),) * 3
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for points, hole in _DEMO_SHAPES[label]:
        xy = points @ np.array([[c, s], [-s, c]]) * r + (cx, cy)
        draw.polygon(xy.ravel().tolist(), fill=background if hole else colour)
    return np.asarray(img.reduce(scale))  # box-filter supersampling: antialiased edges


def build_dataset(out_dir, source, write):
    """The data.py dataset at out_dir that `source` (the string its manifest records) makes: reused if
    already there, else write(folder) writes it (shards, then finish(source=source)) in a temporary
    folder beside out_dir that is renamed into place, so that processes building it at once do not
    disturb each other: the first rename wins, the others reuse its result. UsageError when out_dir
    holds something else."""
    out_dir = str(out_dir).rstrip("/") or "/"
    if _holds(out_dir, source):
        return out_dir
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".partial-", dir=parent)
    try:
        write(partial)
        os.chmod(partial, 0o755)  # mkdtemp makes it private
        try:
            os.rename(partial, out_dir)  # fails if another process put a non-empty out_dir there first
        except OSError:
            if not _holds(out_dir, source):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _holds(out_dir, source):
    """True if out_dir is the dataset made by source, False if absent or empty; UsageError otherwise."""
    if not (os.path.isdir(out_dir) and os.listdir(out_dir)):
        return False
    if os.path.isfile(os.path.join(out_dir, "manifest.json")) and read_manifest(out_dir).get("source") == source:
        return True
    raise UsageError(f"{out_dir}: not empty and not {source}; remove it or pick another directory")


def make_demo_dataset(out_dir, num_items=10000, image_size=32, seed=0, variant="colours"):
    """The procedural 10-class demo pixel dataset at out_dir (build_dataset: reused if already there).
    variant "colours": each class a shape in its own colour (the demo). "shapes": random colour, size,
    position and rotation, so only the shape tells the class (the MP study's dataset)."""
    if variant not in DEMO_VARIANTS:
        raise UsageError(f"unknown demo variant {variant!r}; choose one of {', '.join(DEMO_VARIANTS)}")
    source = f"make_demo_dataset(num_items={num_items}, image_size={image_size}, seed={seed}" + \
        ("" if variant == "colours" else f", variant={variant}") + ")"

    def write(folder):
        rng = np.random.default_rng(seed)
        labels = rng.permutation(np.arange(num_items) % len(demo_class_names))
        writer = ShardWriter(folder, "pixel", (3, image_size, image_size), len(demo_class_names))
        for index, start in enumerate(range(0, num_items, writer.shard_size)):
            part = labels[start:start + writer.shard_size]
            images = np.stack([_render_demo(k, rng, image_size, variant) for k in part])
            writer.write_shard(index, part, images=images.transpose(0, 3, 1, 2))
        writer.finish(class_names=list(demo_class_names), source=source)
    return build_dataset(out_dir, source, write)


def verify(path, chunk=1024):
    """Read every value of the dataset at path; return one line per shard array holding NaN or inf
    (after the header checks LatentDataset makes, which raise UsageError). Pixels are always finite."""
    dataset, problems = LatentDataset(path), []
    for shard, name in enumerate(dataset._names if dataset.kind == "latent" else []):
        for array, a in zip(ARRAYS["latent"], dataset._arrays(shard)):
            bad = []
            for j in range(0, len(a), chunk):
                block = np.asarray(a[j:j + chunk])
                bad.extend(j + np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(1)))
            if bad:
                problems.append(f"{shard_file(dataset.path, name, array)}: {len(bad)} item(s) with NaN or inf, "
                                f"the first at index {bad[0]}")
    return problems


def main(argv=None):
    """`python data.py verify DIR`: exit 0 if every value is finite, 1 naming each bad shard, 2 on bad input."""
    p = ArgumentParser(description="Check a dataset directory (data.py format).")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="read every value; name each shard that holds NaN or inf")
    v.add_argument("path", help="dataset directory")
    args = p.parse_args(argv)
    problems = verify(args.path)
    for line in problems:
        print(line)
    if not problems:
        print(f"{args.path}: every value finite")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run_command("data.py", main))
