"""Tests of data.py: shard format round trips, statistics, atomic writes, errors, demo data."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from cli import UsageError
from data import LatentDataset, ShardWriter, demo_class_names, denormalize, make_demo_dataset, read_manifest

SHAPE = (4, 4, 4)


def write_latent(path, sizes=(7, 5), num_classes=3, **extra):
    """A latent dataset with random float16 posteriors (std >= 0.3); returns manifest and arrays."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(path, "latent", SHAPE, num_classes)
    parts = []
    for index, n in enumerate(sizes):
        labels = rng.integers(0, num_classes, n)
        mean = rng.uniform(-2, 2, (n, *SHAPE)).astype(np.float16)
        std = rng.uniform(0.3, 1.0, (n, *SHAPE)).astype(np.float16)
        writer.write_shard(index, labels, mean=mean, std=std)
        parts.append((labels, mean, std))
    manifest = writer.finish(vae="stabilityai/sd-vae-ft-ema", image_size=32, source="test", **extra)
    return (manifest, *(np.concatenate(p) for p in zip(*parts)))


def write_pixel(path, n=6, num_classes=2):
    images = np.random.default_rng(1).integers(0, 256, (n, 3, 5, 6), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    writer = ShardWriter(path, "pixel", (3, 5, 6), num_classes)
    writer.write_shard(0, labels, images=images)
    writer.finish()
    return labels, images


def test_latent_round_trip_draws_fresh_posterior_samples(tmp_path):
    manifest, labels, mean, std = write_latent(tmp_path)
    ds = LatentDataset(tmp_path)
    assert (len(ds), ds.kind, ds.shape, ds.num_classes) == (12, "latent", SHAPE, 3)
    assert ds.manifest == manifest and manifest["num_items"] == 12
    assert [ds[i][1] for i in range(len(ds))] == labels.tolist() and ds[-1][1] == labels[-1]
    with pytest.raises(IndexError):
        ds[12]
    torch.manual_seed(0)
    n, i = 4000, 9  # item 9 lies in the second shard
    raw = ds[i][0]
    assert raw.dtype == torch.float32 and raw.shape == (2, *SHAPE)
    x = ds.draw(raw.expand(n, *raw.shape))
    assert x.dtype == torch.float32 and x.shape == (n, *SHAPE)
    z = denormalize(x, ds.manifest).double().numpy()
    m, s = mean[i].astype(np.float64), std[i].astype(np.float64)
    # Per element the sample mean has standard error s / sqrt(n) and the sample std about
    # s / sqrt(2n); 5 standard errors on each of the 64 elements: false alarm < 1e-4 (and the
    # seed is fixed). A loader with eps = 0 gives std 0 < s - 5 s / sqrt(2n).
    np.testing.assert_array_less(np.abs(z.mean(0) - m), 5 * s / np.sqrt(n))
    np.testing.assert_array_less(np.abs(z.std(0) - s), 5 * s / np.sqrt(2 * n))
    torch.manual_seed(3)
    first = ds.draw(raw[None])
    torch.manual_seed(3)
    assert torch.equal(first, ds.draw(raw[None]))  # randomness comes from torch's global RNG


def test_normalised_samples_have_zero_mean_unit_std_per_channel(tmp_path):
    write_latent(tmp_path)
    ds = LatentDataset(tmp_path)
    torch.manual_seed(1)
    x = ds.draw(torch.stack([ds[i][0] for _ in range(200) for i in range(len(ds))])).double()
    # every item is drawn equally often, so only eps adds noise: ~0.01 standard error here
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(4, dtype=torch.double), atol=0.04, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(4, dtype=torch.double), atol=0.04, rtol=0)


def test_finish_statistics_match_direct_float64_computation(tmp_path):
    manifest, _, mean, std = write_latent(tmp_path, sizes=(7, 5, 3))
    m, s = mean.astype(np.float64), std.astype(np.float64)
    want_mean, want_std = m.mean((0, 2, 3)), np.sqrt(m.var((0, 2, 3)) + (s ** 2).mean((0, 2, 3)))
    np.testing.assert_allclose(manifest["channel_mean"], want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(manifest["channel_std"], want_std, rtol=1e-12)
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f) == manifest
    writer = ShardWriter(tmp_path, "latent", SHAPE, 3)
    chunked_mean, chunked_std = writer._channel_stats(3, chunk=2)  # chunks cross shard ends
    np.testing.assert_allclose(chunked_mean, want_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked_std, want_std, rtol=1e-12)


def test_finish_keeps_given_statistics(tmp_path):
    manifest, *_ = write_latent(tmp_path, channel_mean=[0.0] * 4, channel_std=[2.0] * 4)
    assert manifest["channel_mean"] == [0.0] * 4 and manifest["channel_std"] == [2.0] * 4


def test_pixel_round_trip(tmp_path):
    labels, images = write_pixel(tmp_path)
    ds = LatentDataset(tmp_path)
    assert ds.kind == "pixel" and ds.manifest["image_size"] == 6 and ds.manifest["channel_mean"] is None
    for i in range(len(ds)):
        raw, y = ds[i]
        assert torch.equal(raw, torch.from_numpy(images[i]))
        x = ds.draw(raw[None])[0]
        assert y == labels[i] and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
        torch.testing.assert_close(x, torch.from_numpy(images[i]).float() / 127.5 - 1)
        assert torch.equal(denormalize(x, ds.manifest), torch.from_numpy(images[i]))


def test_hflip_mirrors_half_the_time(tmp_path):
    write_pixel(tmp_path)
    ds = LatentDataset(tmp_path, hflip=True)
    plain = LatentDataset(tmp_path).draw(ds[0][0][None])[0]
    torch.manual_seed(0)
    flips = 0
    for x in ds.draw(ds[0][0].expand(400, 3, 5, 6)):
        flips += torch.equal(x, plain.flip(-1))
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
    assert 150 <= flips <= 250  # Binomial(400, 1/2): mean 200, sd 10


def test_dataloader_workers_and_pickling(tmp_path):
    labels, _ = write_pixel(tmp_path)
    ds = LatentDataset(tmp_path)
    ds[0]  # open the mmaps in this process first; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert torch.cat([y for _, y in loader]).tolist() == labels.tolist()
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._open == {} and torch.equal(copy[1][0], ds[1][0])


def test_shard_done_and_interrupted_write(tmp_path, monkeypatch):
    writer = ShardWriter(tmp_path, "pixel", (3, 2, 2), 2)
    images = np.zeros((3, 3, 2, 2), np.uint8)
    assert not writer.shard_done(0)
    writer.write_shard(0, [0, 1, 0], images=images)
    assert writer.shard_done(0)
    real_replace = os.replace

    def killed_before_labels(src, dst):
        if dst.endswith(".labels.npy"):
            raise RuntimeError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", killed_before_labels)
    with pytest.raises(RuntimeError):
        writer.write_shard(1, [1], images=images[:1])
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "shard-00001.images.npy")
    assert any(f.startswith("shard-00001.labels") for f in os.listdir(tmp_path))  # leftover temp
    assert not writer.shard_done(1)
    assert writer.finish()["shards"] == [{"name": "shard-00000", "count": 3}]
    writer.write_shard(1, [1], images=images[:1])  # resume
    assert writer.shard_done(1) and writer.finish()["num_items"] == 4
    assert len(LatentDataset(tmp_path)) == 4


def test_finish_refuses_gaps_and_empty_datasets(tmp_path):
    writer = ShardWriter(tmp_path, "pixel", (3, 2, 2), 2)
    with pytest.raises(UsageError, match="empty"):
        writer.finish()
    for index in (0, 2):
        writer.write_shard(index, [0], images=np.zeros((1, 3, 2, 2), np.uint8))
    with pytest.raises(UsageError, match="shard-00001.labels.npy"):
        writer.finish()
    with pytest.raises(UsageError, match="sets"):
        writer.finish(num_items=5)


@pytest.mark.parametrize("arrays, message", [
    (dict(labels=[0, 2]), "shard-00000.labels.npy"),
    (dict(labels=[0, 1], images=np.zeros((2, 3, 2, 3), np.uint8)), "shard-00000.images.npy"),
    (dict(labels=[0, 1], images=np.zeros((2, 3, 2, 2))), "shard-00000.images.npy"),
    (dict(labels=[0, 1], images=np.zeros((2, 3, 2, 2), np.uint8), mean=np.zeros((2, 3, 2, 2))),
     "take only"),
])
def test_write_shard_rejects_bad_arrays(tmp_path, arrays, message):
    arrays.setdefault("images", None)
    with pytest.raises(UsageError, match=message):
        ShardWriter(tmp_path, "pixel", (3, 2, 2), 2).write_shard(0, **arrays)


def edit_manifest(path, **changes):
    file = path / "manifest.json"
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps({**manifest, **changes}))


BAD_DATASETS = {
    "missing directory": (shutil.rmtree, "ds: dataset directory not found"),
    "missing manifest": (lambda p: os.remove(p / "manifest.json"), "manifest.json: missing"),
    "malformed manifest": (lambda p: (p / "manifest.json").write_text("{oops"), "manifest.json: malformed"),
    "unknown version": (lambda p: edit_manifest(p, version=2), "manifest.json: not a map-dit"),
    "missing statistics": (lambda p: edit_manifest(p, channel_std=None), "manifest.json: latent"),
    "missing shard": (lambda p: os.remove(p / "shard-00001.std.npy"), "shard-00001.std.npy: missing"),
    "shape mismatch": (lambda p: np.save(p / "shard-00001.mean.npy", np.zeros((5, 4, 4, 2), np.float16)),
                       "shard-00001.mean.npy: holds"),
    "count mismatch": (lambda p: edit_manifest(p, num_items=11, shards=[
        {"name": "shard-00000", "count": 6}, {"name": "shard-00001", "count": 5}]),
        "shard-00000.labels.npy: holds"),
    "truncated shard": (lambda p: (p / "shard-00000.mean.npy").write_bytes(
        (p / "shard-00000.mean.npy").read_bytes()[:300]), "shard-00000.mean.npy: unreadable"),
    "label out of range": (lambda p: np.save(p / "shard-00000.labels.npy", np.array([0] * 6 + [3])),
                           "shard-00000.labels.npy: labels"),
    "empty dataset": (lambda p: edit_manifest(p, num_items=0, shards=[]), "manifest.json: empty"),
    "kind not a string": (lambda p: edit_manifest(p, kind=["latent"]), r"unknown kind \['latent'\]"),
    "shard outside the directory": (lambda p: edit_manifest(p, shards=[
        {"name": "../../shard-00000", "count": 7}, {"name": "shard-00001", "count": 5}]),
        "'../../shard-00000' is not a plain file name"),
    "absolute shard path": (lambda p: edit_manifest(p, shards=[
        {"name": str(p / "shard-00000"), "count": 7}, {"name": "shard-00001", "count": 5}]),
        "is not a plain file name"),
}


@pytest.mark.parametrize("case", BAD_DATASETS)
def test_bad_datasets_raise_data_error_naming_the_file(tmp_path, case):
    path = tmp_path / "ds"
    write_latent(path)
    corrupt, message = BAD_DATASETS[case]
    corrupt(path)
    with pytest.raises(UsageError, match=message):
        LatentDataset(path)


def test_demo_dataset(tmp_path):
    path = make_demo_dataset(tmp_path / "a", num_items=300, seed=1)
    assert make_demo_dataset(tmp_path / "b", num_items=300, seed=1) == str(tmp_path / "b")
    make_demo_dataset(tmp_path / "c", num_items=300, seed=2)
    load = lambda d, a: np.load(tmp_path / d / f"shard-00000.{a}.npy")  # noqa: E731
    images, labels = load("a", "images"), load("a", "labels")
    assert np.array_equal(images, load("b", "images")) and np.array_equal(labels, load("b", "labels"))
    assert not np.array_equal(images, load("c", "images"))
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]  # no .partial directory left
    ds = LatentDataset(path)
    assert (ds.kind, ds.shape, ds.num_classes) == ("pixel", (3, 32, 32), 10)
    assert ds.manifest["class_names"] == list(demo_class_names) and len(demo_class_names) == 10
    assert set(labels.tolist()) == set(range(10)) and images.dtype == np.uint8
    assert images.min() < 40 and images.max() > 200  # dark background, bright shapes
    pixels = images.transpose(0, 2, 3, 1).astype(np.float64)
    colours = []
    for k in range(10):
        shape_pixels = pixels[labels == k].reshape(-1, 3)
        colours.append(shape_pixels[shape_pixels.max(1) > 100].mean(0))
    distance = np.linalg.norm(np.array(colours)[:, None] - np.array(colours)[None], axis=-1)
    assert distance[~np.eye(10, dtype=bool)].min() > 40  # every class has its own colour
    assert make_demo_dataset(path, num_items=300, seed=1) == path  # reused as it is
    with pytest.raises(UsageError, match="not empty"):
        make_demo_dataset(path, num_items=100, seed=1)


def test_demo_dataset_built_twice_at_once(tmp_path, monkeypatch):
    """A second build of the same demo data starting while the first is half-way (a second process,
    here re-entered in the middle of the first's shard writing) leaves both with the complete dataset."""
    real_write, inner = ShardWriter.write_shard, []

    def write_and_race(self, *a, **k):
        if not inner:
            inner.append("started")
            inner.append(make_demo_dataset(tmp_path / "demo", num_items=60, seed=3))
        return real_write(self, *a, **k)
    monkeypatch.setattr(ShardWriter, "write_shard", write_and_race)
    assert make_demo_dataset(tmp_path / "demo", num_items=60, seed=3) == str(tmp_path / "demo") == inner[1]
    assert len(LatentDataset(tmp_path / "demo")) == 60 and os.listdir(tmp_path) == ["demo"]


def test_demo_dataset_built_by_two_processes(tmp_path):
    """Two real processes building the demo data into one empty directory both succeed, with one result."""
    code = f"import data; data.make_demo_dataset({str(tmp_path / 'demo')!r}, num_items=400, seed=4)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert len(LatentDataset(tmp_path / "demo")) == 400 and os.listdir(tmp_path) == ["demo"]


def _foreground(images):
    """(n, H, W) bool: pixels clearly brighter than the image's (uniform, dark) background."""
    brightness = images.max(1)
    return brightness > brightness.min((1, 2), keepdims=True) + 0.15


def _colour_features(images):
    """(n, 6): mean shape colour and background colour, nothing of the shape's outline."""
    mask = _foreground(images)[:, None]
    shape_colour = (images * mask).sum((2, 3)) / mask.sum((2, 3))
    return np.concatenate([shape_colour, images.min((2, 3))], 1).astype(np.float32)


def _silhouettes(images):
    return _foreground(images)[:, None].astype(np.float32)


def _held_out_accuracy(net, train, test, steps, lr, batch=None):
    (x, y), (x_test, y_test) = [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in (train, test)]
    opt = torch.optim.Adam(net.parameters(), lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(len(x), (batch,), generator=g) if batch else slice(None)
        loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (net(x_test).argmax(1) == y_test).float().mean().item()


def test_shape_variant_class_is_shape_alone(tmp_path):
    """A colour-only classifier is at chance on the shapes variant (but near 100% on the colour demo, so it
    can read colour); a silhouette classifier is near 100%. Chance is 10%; with 600 test items its
    standard deviation is 1.2%, so 20% is far outside it."""
    torch.manual_seed(0)

    def load(variant, n, seed):
        path = make_demo_dataset(tmp_path / f"{variant}-{seed}", num_items=n, seed=seed, variant=variant)
        return (np.load(os.path.join(path, "shard-00000.images.npy")).astype(np.float32) / 255,
                np.load(os.path.join(path, "shard-00000.labels.npy")))

    def colour_accuracy(variant):
        (x, y), (x_test, y_test) = load(variant, 1200, 1), load(variant, 600, 2)
        mlp = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        return _held_out_accuracy(mlp, (_colour_features(x), y), (_colour_features(x_test), y_test), 200, 1e-2)

    assert colour_accuracy("colours") > 0.9
    assert colour_accuracy("shapes") < 0.2
    (x, y), (x_test, y_test) = load("shapes", 1200, 1), load("shapes", 600, 2)
    cnn = torch.nn.Sequential(
        torch.nn.AvgPool2d(2), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 10))
    assert _held_out_accuracy(cnn, (_silhouettes(x), y), (_silhouettes(x_test), y_test), 250, 3e-3, 64) > 0.9


def test_shape_variant_is_its_own_dataset(tmp_path):
    colours = make_demo_dataset(tmp_path / "c", num_items=100, seed=1)
    shapes = make_demo_dataset(tmp_path / "s", num_items=100, seed=1, variant="shapes")
    assert read_manifest(shapes)["source"] != read_manifest(colours)["source"]
    assert read_manifest(colours)["source"] == "make_demo_dataset(num_items=100, image_size=32, seed=1)"  # old demo data dirs stay valid
    with pytest.raises(UsageError, match="not empty"):
        make_demo_dataset(shapes, num_items=100, seed=1)
    with pytest.raises(UsageError, match="unknown demo variant"):
        make_demo_dataset(tmp_path / "x", num_items=100, variant="texture")
