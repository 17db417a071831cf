"""Tests of download.py, offline: a tiny random AutoencoderKL stands in for the SD VAE, a small
generated ImageFolder for ImageNet, and a local HTTP server for the DiT checkpoint host."""
import glob
import http.server
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import download
import imagenet
from cli import UsageError
from data import LatentDataset
from helpers import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def vae_dir(tiny_vae):
    """A tiny AutoencoderKL (downsampling 2, 4 latent channels) with random weights, saved."""
    return tiny_vae(levels=2, channels=(8, 16))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """3 classes x 5 images of varied sizes and modes, one corrupt .jpg and one non-image file."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        os.makedirs(root / name)
        for j in range(5):
            w, h = [(40, 24), (70, 40)][j] if j < 2 else rng.integers(18, 70, 2)
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            (image.convert("L") if j == 3 else image).save(root / name / f"{j}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


def encode_args(src, out, *extra):
    return ["imagenet", "--src", src, "--out", str(out), "--image-size", "16", "--shard-size", "4",
            "--batch-size", "3", "--num-workers", "0", *extra]


def test_center_crop_matches_adm_by_hand():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # 300 x 200
    got = imagenet.center_crop_arr(image, 64)
    # short side 200 >= 2 * 64: halve with BOX to 150 x 100; 100 < 128 stops. Bicubic to the
    # short side 64: 96 x 64. Centre columns 16..80.
    want = np.array(image.resize((150, 100), Image.BOX).resize((96, 64), Image.BICUBIC))[:, 16:80]
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    small = Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8))  # no halving
    want = np.array(small.resize((71, 64), Image.BICUBIC))[:, 3:67]
    np.testing.assert_array_equal(imagenet.center_crop_arr(small, 64), want)


def test_list_images_sorted_with_class_labels(src):
    items, classes = imagenet.list_images(src)
    assert classes == CLASSES and len(items) == 16  # not notes.txt; broken.jpg looks like an image
    assert [label for _, label in items] == [0] * 5 + [1] * 6 + [2] * 5
    names = [os.path.basename(p) for p, _ in items[5:11]]
    assert names == [f"{j}.png" for j in range(5)] + ["broken.jpg"]


def test_latent_encoding_resumes_and_matches_the_vae(src, vae_dir, tmp_path):
    out = tmp_path / "latents"
    download.main(encode_args(src, out, "--vae-path", vae_dir))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["kind"], manifest["shape"]) == ("latent", [4, 8, 8])
    assert manifest["num_items"] == 15 and [s["count"] for s in manifest["shards"]] == [4, 4, 3, 4]
    assert manifest["skipped"] == 1 and manifest["class_names"] == CLASSES
    assert manifest["vae"] == "stabilityai/sd-vae-ft-ema" and manifest["flip"] is False
    skip = json.loads((out / "shard-00002.skipped.json").read_text())
    assert skip["skipped"] == 1 and skip["files"][0].endswith("broken.jpg")
    ds = LatentDataset(out)
    assert (len(ds), ds.shape, ds.num_classes) == (15, (4, 8, 8), 3)
    assert [ds[i][1] for i in range(15)] == [0] * 5 + [1] * 5 + [2] * 5

    # Items 0 and 1 by a second path. cat/0.png is 40 x 24: bicubic to 27 x 16, columns 5..21.
    # cat/1.png is 70 x 40: 40 >= 2 * 16, so box-halved to 35 x 20; bicubic to 28 x 16; 6..22.
    from diffusers import AutoencoderKL
    cat0, cat1 = (Image.open(os.path.join(src, "cat", f"{j}.png")) for j in (0, 1))
    crops = [np.array(cat0.resize((27, 16), Image.BICUBIC))[:, 5:21],
             np.array(cat1.resize((35, 20), Image.BOX).resize((28, 16), Image.BICUBIC))[:, 6:22]]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = AutoencoderKL.from_pretrained(vae_dir).encode(x).latent_dist
    mean, std = np.load(out / "shard-00000.mean.npy"), np.load(out / "shard-00000.std.npy")
    np.testing.assert_allclose(mean[:2], posterior.mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(std[:2], posterior.std.numpy(), rtol=2e-3, atol=2e-3)

    # Interrupt: shard 1 lost its labels file (half written) and no manifest was written yet.
    files = sorted(f for f in os.listdir(out) if f.startswith("shard-"))
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in files}
    os.remove(out / "shard-00001.labels.npy")
    os.remove(out / "manifest.json")
    download.main(encode_args(src, out, "--vae-path", vae_dir))
    assert sorted(f for f in os.listdir(out) if f.startswith("shard-")) == files
    for f in files:  # finished shards untouched, shard 1 written again
        assert (os.stat(out / f).st_mtime_ns == mtimes[f]) != f.startswith("shard-00001"), f
    assert json.loads((out / "manifest.json").read_text()) == manifest  # skipped still 1
    assert LatentDataset(out).num_classes == 3

    # Resuming with other settings is refused (the shards would not fit together).
    code = download.cli(encode_args(src, out, "--vae-path", vae_dir, "--flip"))
    assert code == 2


def test_vae_encodes_in_float32_unless_bf16_is_asked_for(src, vae_dir, tmp_path, monkeypatch):
    """float32 by default (DiT and EDM2 encode so; bf16 is coarser than the float16 stored), on any
    device; --bf16 opts in, is recorded in the manifest, and changes the arithmetic."""
    calls, real_encode = [], imagenet.encode

    def spy(vae, images, device, bf16=False):
        calls.append(bf16)
        return real_encode(vae, images, device, bf16)

    monkeypatch.setattr(imagenet, "encode", spy)
    download.main(encode_args(src, tmp_path / "fp32", "--vae-path", vae_dir))
    assert calls and not any(calls)
    calls.clear()
    download.main(encode_args(src, tmp_path / "bf16", "--vae-path", vae_dir, "--bf16"))
    assert calls and all(calls)
    dtypes = [json.loads((tmp_path / d / "manifest.json").read_text())["vae_dtype"] for d in ("fp32", "bf16")]
    assert dtypes == ["float32", "bfloat16"]
    fp32, bf16 = (np.load(tmp_path / d / "shard-00000.mean.npy").astype(np.float64) for d in ("fp32", "bf16"))
    assert np.abs(bf16 - fp32).max() > 0  # bf16 autocast really ran
    assert np.sqrt(np.mean((bf16 - fp32) ** 2) / np.mean(fp32 ** 2)) < 0.05  # and is only coarser


def test_pixel_mode_with_flip(src, tmp_path):
    out = tmp_path / "pixels"
    download.main(encode_args(src, out, "--vae", "none", "--flip"))
    ds = LatentDataset(out)
    assert (len(ds), ds.kind, ds.shape, ds.manifest["skipped"]) == (30, "pixel", (3, 16, 16), 1)
    assert ds.manifest["vae"] is None and ds.manifest["flip"] is True
    images = np.load(out / "shard-00000.images.npy")
    image = Image.open(os.path.join(src, "cat", "1.png")).convert("RGB")
    crop = imagenet.center_crop_arr(image, 16)
    np.testing.assert_array_equal(images[2], crop.transpose(2, 0, 1))  # image 1 is item 2
    np.testing.assert_array_equal(images[3], images[2][:, :, ::-1])  # and its mirror item 3


def test_bad_inputs_exit_2_with_one_line(src, tmp_path):
    empty = tmp_path / "empty"
    os.makedirs(empty / "some_class")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    commands = [["imagenet", "--out", str(tmp_path / "a")],  # missing --src
                ["imagenet", "--src", str(empty), "--out", str(tmp_path / "b")],  # no images
                encode_args(src, tmp_path / "c"),  # offline, empty cache, no --vae-path
                ["vaes"]]  # unknown sub-command
    procs = [subprocess.Popen([sys.executable, "download.py", *c], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in commands]  # at once: each python start-up takes seconds
    needles = ["--src", "no images", "--vae-path", "invalid choice"]
    for p, needle in zip(procs, needles):
        code, err = p.wait(timeout=120), p.stderr.read()
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert needle in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "c")  # nothing written before the VAE was there


def test_other_bad_inputs_in_process(src, vae_dir, tmp_path, capsys):
    for args, needle in [([], "required"),  # no sub-command
                         (["vae", "--vae-path", str(tmp_path / "nope")], "not a directory"),
                         (["vae", "--vae-path", src], "not an AutoencoderKL"),
                         (encode_args(src, tmp_path / "x", "--batch-size", "0"), "--batch-size"),
                         (encode_args(src, tmp_path / "x", "--vae-path", vae_dir,
                                      "--image-size", "15"), "not a multiple")]:
        code = download.cli(args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert needle in err
    download.main(["vae", "--vae-path", vae_dir])
    assert "4 latent channels" in capsys.readouterr().out


def fake_dit(path, image_size=256, drop=None):
    """A state dict with the DiT-XL/2 keys (tiny tensors, but the real pos_embed shape)."""
    state = {k: torch.zeros(1) for k in download.dit_keys() if k != drop}
    state["pos_embed"] = torch.zeros(1, (image_size // 16) ** 2, 1152)
    torch.save(state, path)
    return path.read_bytes()


class Server:
    """A local HTTP server of one payload that honours Range requests unless told otherwise."""

    def __init__(self, payload):
        self.payload, self.ranges, self.honour_range = payload, [], True
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                start = int(asked[6:-1]) if asked and server.honour_range else 0
                if start >= len(server.payload) > 0:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(server.payload) - start))
                self.end_headers()
                self.wfile.write(server.payload[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/DiT-XL-2-256x256.pt"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_dit_download_resumes_replaces_and_verifies(tmp_path):
    payload = fake_dit(tmp_path / "good.pt")
    server = Server(payload)
    try:
        out = tmp_path / "a"
        os.makedirs(out)
        (out / "DiT-XL-2-256x256.pt.part").write_bytes(payload[:1000])  # an interrupted download
        path = download.get_dit(256, str(out), server.url)
        assert server.ranges == ["bytes=1000-"] and open(path, "rb").read() == payload
        assert os.listdir(out) == ["DiT-XL-2-256x256.pt"]
        assert download.get_dit(256, str(out), server.url) == path and len(server.ranges) == 1
        with pytest.raises(UsageError, match="pos_embed"):  # a 256 px file is no 512 px one
            download.verify_dit(path, 512)

        server.honour_range = False  # the server sends it all: the stale part is replaced
        out = tmp_path / "b"
        os.makedirs(out)
        (out / "DiT-XL-2-256x256.pt.part").write_bytes(b"junk" * 100)
        assert open(download.get_dit(256, str(out), server.url), "rb").read() == payload

        server.honour_range = True  # a complete part (416 for the range past its end) is kept
        out = tmp_path / "c"
        os.makedirs(out)
        (out / "DiT-XL-2-256x256.pt.part").write_bytes(payload)
        assert open(download.get_dit(256, str(out), server.url), "rb").read() == payload

        torch.save({"ema": torch.load(path, weights_only=True)}, tmp_path / "sit.pt")  # SiT's wrapping
        server.payload = (tmp_path / "sit.pt").read_bytes()
        sit = download.get_dit(256, str(tmp_path / "sit"), server.url, family="SiT")
        assert os.path.basename(sit) == "SiT-XL-2-256x256.pt" and set(download.read_official(sit)) == download.dit_keys()

        server.payload = fake_dit(tmp_path / "bad.pt", drop="blocks.27.mlp.fc2.bias")
        out = tmp_path / "d"
        with pytest.raises(UsageError, match="291 keys"):
            download.get_dit(256, str(out), server.url)
        assert os.listdir(out) == []  # the wrong file is not kept
    finally:
        server.httpd.shutdown()


def fake_ref_batch(path, size=64, n=3, spatial=2023):
    np.savez(path, arr_0=np.zeros((n, size, size, 3), np.uint8), mu=np.zeros(2048, np.float16),
             sigma=np.zeros((2048, 2048), np.float16), mu_s=np.zeros(spatial, np.float16),
             sigma_s=np.zeros((spatial, spatial), np.float16))
    return open(path, "rb").read()


def test_ref_batch_download_verifies_and_fails_offline_in_one_line(tmp_path, capsys, monkeypatch):
    server = Server(fake_ref_batch(tmp_path / "good.npz"))
    try:
        monkeypatch.setattr(download, "REF_BATCH_URL", server.url.rsplit("/", 1)[0] + "/{0}/VIRTUAL_imagenet{0}_labeled.npz")
        out = tmp_path / "refs"
        download.main(["ref-batch", "--image-size", "64", "--out", str(out)])
        assert "3 images of 64 px" in capsys.readouterr().out
        assert os.listdir(out) == ["VIRTUAL_imagenet64_labeled.npz"]
        with pytest.raises(UsageError, match="arr_0 images"):  # a 64 px batch is no 128 px one
            download.verify_ref_batch(str(out / "VIRTUAL_imagenet64_labeled.npz"), 128)
        server.payload = fake_ref_batch(tmp_path / "bad.npz", spatial=2048)  # sFID statistics of the wrong size
        code = download.cli(["ref-batch", "--image-size", "64", "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the download's progress bar
        assert code == 2 and err.startswith("download.py: error:") and "sfid statistics" in err
        assert os.listdir(tmp_path / "bad") == []  # the wrong file is not kept
    finally:
        server.httpd.shutdown()
    monkeypatch.setattr(download, "REF_BATCH_URL", "http://127.0.0.1:9/{0}/VIRTUAL_imagenet{0}_labeled.npz")
    code = download.cli(["ref-batch", "--image-size", "128", "--out", str(tmp_path / "offline")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot download" in err, err


@pytest.fixture(scope="module")
def hub_copies(src, tmp_path_factory):
    """The files of `src` in list_images' order (broken.jpg included) as a Hugging Face dataset: a caption
    column to pass over, the files' bytes in an Image column `picture` and the class in a ClassLabel
    `category` (names no detection by name would find), written with save_to_disk and as parquet in
    the Hub's layout: train in 2 files, and a validation file that --split train must leave out."""
    from datasets import ClassLabel, Dataset, Features, Image, Value
    items, classes = imagenet.list_images(src)
    features = Features({"caption": Value("string"), "picture": Image(), "category": ClassLabel(names=classes)})
    ds = Dataset.from_dict({"caption": [os.path.basename(p) for p, _ in items],
                            "picture": [{"bytes": open(p, "rb").read(), "path": os.path.relpath(p, src)}
                                        for p, _ in items],
                            "category": [label for _, label in items]}, features=features)
    root = tmp_path_factory.mktemp("hub")
    ds.save_to_disk(str(root / "disk"))
    ds.select(range(9)).to_parquet(str(root / "parquet" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(9, len(ds))).to_parquet(str(root / "parquet" / "data" / "train-00001-of-00002.parquet"))
    ds.select([0, 1]).to_parquet(str(root / "parquet" / "data" / "validation-00000-of-00001.parquet"))
    return {"disk": str(root / "disk"), "parquet": str(root / "parquet")}


def shard_arrays(out):
    """{file name: array} of a dataset folder's .npy files."""
    return {f: np.load(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.endswith(".npy")}


def assert_same_dataset(a, b, ignore=()):
    """Bit-equal shards (labels and arrays) and the same manifest apart from the keys ignored."""
    arrays_a, arrays_b = shard_arrays(a), shard_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    kept = [{k: v for k, v in json.loads(open(os.path.join(d, "manifest.json")).read()).items() if k not in ignore}
            for d in (a, b)]
    assert kept[0] == kept[1]


def test_hub_copies_encode_like_the_imagefolder(src, hub_copies, vae_dir, tmp_path):
    """The same files give bit-equal latents and labels, whichever source holds them: the same decoder,
    crop, VAE batches (the unreadable row drops out of the same batch) and arithmetic."""
    outs = {name: tmp_path / name for name in ("folder", "disk", "parquet")}
    download.main(encode_args(src, outs["folder"], "--vae-path", vae_dir))
    for name in ("disk", "parquet"):
        download.main(encode_args(hub_copies[name], outs[name], "--vae-path", vae_dir))
        assert_same_dataset(outs["folder"], outs[name], ignore=("source", "split"))
        manifest = json.loads((outs[name] / "manifest.json").read_text())
        assert (manifest["source"], manifest["split"]) == (hub_copies[name], "train" if name == "parquet" else None)
        assert manifest["class_names"] == CLASSES and manifest["skipped"] == 1 and manifest["num_items"] == 15
        skip = json.loads((outs[name] / "shard-00002.skipped.json").read_text())
        assert skip["skipped"] == 1 and skip["files"][0].startswith("row 10 (")  # cat 0-4, dog 0-4, broken
        assert skip["files"][0].endswith("broken.jpg)")  # the path datasets kept: dog/broken.jpg or broken.jpg


def test_hub_id_streams_and_an_interrupted_encode_resumes(src, hub_copies, tmp_path, monkeypatch):
    """A Hub id goes to datasets.load_dataset(id, split=..., streaming=True), here answered by a stream of
    the local parquet files with the split size a Hub card gives. Interrupted in shard 2, the encode
    resumes (skipping the stream to row 8) to the same shards as the ImageFolder gives."""
    import datasets
    real_load, calls = datasets.load_dataset, []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        files = sorted(glob.glob(os.path.join(hub_copies["parquet"], "data", "train-*.parquet")))
        ds = real_load("parquet", data_files={"train": files}, split="train", streaming=True)
        ds.info.splits = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=16)})
        return ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    real_encode_shard, encoded = imagenet.encode_shard, []

    def interrupted(items, *args):
        encoded.append([name for name, _, _ in items])
        if len(encoded) == 3:
            raise KeyboardInterrupt
        return real_encode_shard(items, *args)

    monkeypatch.setattr(imagenet, "encode_shard", interrupted)
    out, argv = tmp_path / "hub", encode_args("someone/tiny-imagenet", tmp_path / "hub", "--vae", "none")
    assert download.cli(argv) == 130
    assert calls == [("someone/tiny-imagenet", {"split": "train", "streaming": True})]
    assert sorted(f for f in os.listdir(out) if f.endswith("labels.npy")) == ["shard-00000.labels.npy",
                                                                            "shard-00001.labels.npy"]
    encoded.clear()
    download.main(argv)
    assert [[name.split(" (")[0] for name in names] for names in encoded] == [
        [f"row {k}" for k in range(8, 12)], [f"row {k}" for k in range(12, 16)]]  # shards 2 and 3 only
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["source"], manifest["split"]) == ("someone/tiny-imagenet", "train")
    monkeypatch.undo()
    download.main(encode_args(src, tmp_path / "folder", "--vae", "none"))
    assert_same_dataset(tmp_path / "folder", out, ignore=("source", "split"))


def test_two_processes_stream_the_same_dataset_as_one(hub_copies, tmp_path):
    """torchrun with 2 gloo ranks over the streamed parquet: rank r makes shards r, r + 2 of the same
    global rows, so the dataset is bit-equal to one process's."""
    download.main(encode_args(hub_copies["parquet"], tmp_path / "one", "--vae", "none"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    torchrun([os.path.join(ROOT, "download.py"), *encode_args(hub_copies["parquet"], tmp_path / "two", "--vae",
                                                              "none", "--no-progress")], 2, ROOT, env, timeout=240)
    assert_same_dataset(tmp_path / "one", tmp_path / "two")


def test_hub_datasets_without_labels_or_images_exit_2_with_one_line(hub_copies, tmp_path, capsys):
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(png, format="PNG")
    pictures = [{"bytes": png.getvalue(), "path": None}] * 3
    unlabeled = Dataset.from_dict({"image": pictures, "caption": ["a", "b", "c"]},
                                  features=Features({"image": ImageFeature(), "caption": Value("string")}))
    unlabeled.save_to_disk(str(tmp_path / "unlabeled"))
    paths = Dataset.from_dict({"img": ["x.png"] * 3, "label": [0, 1, 0]},
                              features=Features({"img": Value("string"), "label": ClassLabel(names=["a", "b"])}))
    paths.to_parquet(str(tmp_path / "paths.parquet"))
    integers = Dataset.from_dict({"image": pictures, "labels": [0, 4, 2]},
                                 features=Features({"image": ImageFeature(), "labels": Value("int64")}))
    integers.save_to_disk(str(tmp_path / "integers"))
    integers.to_parquet(str(tmp_path / "integers.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 cut short")
    (tmp_path / "notes.txt").write_text("not parquet")
    capsys.readouterr()  # datasets' progress bars
    for source, extra, needles in [
            ("unlabeled", [], ["no label column", "image (Image), caption (string)", "--label-column"]),
            ("paths.parquet", [], ["column img holds string, not images", "label (ClassLabel)", "--image-column"]),
            ("unlabeled", ["--label-column", "caption"], ["column caption holds string, not class labels"]),
            ("unlabeled", ["--image-column", "photo"], ["--image-column photo: no such column"]),
            ("integers.parquet", [], ["integers without class names", "save_to_disk"]),
            ("nowhere/at/all", [], ["no such file or folder"]),
            ("broken.parquet", [], ["broken.parquet: not a readable parquet file"]),
            ("notes.txt", [], ["no parquet files", "notes.txt", "a Hub id"]),
            (hub_copies["parquet"], ["--split", "test"], ["--split test", "has the splits train, validation"])]:
        code = download.cli(encode_args(str(tmp_path / source), tmp_path / "out", "--vae", "none", *extra))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert all(needle in err for needle in needles), err
    assert not os.path.exists(tmp_path / "out")
    # Integers without names are classes 0..max where save_to_disk lets them be counted first.
    download.main(encode_args(str(tmp_path / "integers"), tmp_path / "out", "--vae", "none"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["num_classes"], manifest["class_names"], manifest["num_items"]) == (5, None, 3)
