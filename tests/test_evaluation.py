"""Tests of evaluation.py and feature_nets.py: IS, precision/recall and Frechet distances against hand
computations and closed forms; the Inception tensors (pool, spatial, logits) against torchvision's own
forward of the same network; DINOv2's CLS features; caching, sharding over 2 processes and resuming.
Networks are built from the real architectures with random weights (nothing is downloaded; the
Inception weights come from conftest.py's inception_weights)."""
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import evaluation
import feature_nets
from cli import UsageError


@pytest.fixture(scope="module")
def inception(inception_weights):
    return feature_nets.InceptionNet(inception_weights)


class TinyNet:
    """A small random conv net as a feature network (uint8 NHWC -> 8 features), counting its calls."""

    name, key, outputs = "tiny", "tiny-v1", {"features": 8}

    def __init__(self, fail_after=None):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.calls, self.fail_after = 0, fail_after

    @torch.no_grad()
    def __call__(self, batch):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stopped")
        self.calls += 1
        return {"features": self.net(torch.as_tensor(np.array(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1)}


def random_images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


#################################################################################
#                               Metric definitions                              #
#################################################################################

def test_inception_score_closed_forms_and_split_averaging():
    k = 7
    uniform = np.tile(np.eye(k), (3, 1))  # one-hot predictions spread evenly over k classes
    assert evaluation.inception_score(uniform) == pytest.approx(k, rel=1e-12)
    same = np.tile(np.eye(k)[2], (10, 1))  # every sample predicts one class: KL = 0
    assert evaluation.inception_score(same) == pytest.approx(1.0, abs=1e-12)
    # Split averaging: split 1 = one-hot over 2 classes (IS 2), split 2 = one class only (IS 1):
    # the mean over splits is 1.5, while the whole set at once would give exp(H(p(y))) of
    # p(y) = (2/4, 1/4, 1/4) against ... = a different number.
    probs = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], float)
    assert evaluation.inception_score(probs, split_size=2) == pytest.approx(1.5, abs=1e-12)
    whole = np.exp(-(0.25 * np.log(0.25) * 2 + 0.5 * np.log(0.5)))  # KL(onehot || p) = -log p_y, averaged
    assert evaluation.inception_score(probs, split_size=4) == pytest.approx(whole, rel=1e-12)
    # a soft case by hand: p(y|x) = (0.8, 0.2) and (0.2, 0.8); p(y) = (0.5, 0.5);
    # KL = 0.8 log 1.6 + 0.2 log 0.4 for both
    soft = np.array([[0.8, 0.2], [0.2, 0.8]])
    want = np.exp(0.8 * np.log(1.6) + 0.2 * np.log(0.4))
    assert evaluation.inception_score(soft) == pytest.approx(want, rel=1e-12)
    assert np.allclose(evaluation.softmax64(np.log(soft)), soft)


def test_precision_recall_identical_far_apart_and_a_hand_computed_case():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 6))
    assert evaluation.precision_recall(a, a) == (1.0, 1.0)
    assert evaluation.precision_recall(a, a + 100.0) == (0.0, 0.0)
    # 1-d, k = 1 (the nearest other point; the point itself is the 0-th neighbour).
    # reference 0, 1, 3, 7: squared radii 1, 1, 4, 16.  samples 0.5, 2.9, 10, 10.5: squared radii
    # 5.76, 5.76, 0.25, 0.25.  Precision: 0.5 (0.25 from 0 <= 1) yes, 2.9 (0.01 from 3 <= 4) yes,
    # 10 (9 from 7 <= 16) yes, 10.5 (12.25 <= 16) yes -> 1.  Recall: 0 (0.25 from 0.5 <= 5.76) yes,
    # 1 (0.25 <= 5.76) yes, 3 (0.01 <= 5.76) yes, 7 (9 from 10 > 0.25; 16.81 from 2.9 > 5.76) no -> 3/4.
    ref = np.array([[0.0], [1.0], [3.0], [7.0]])
    sam = np.array([[0.5], [2.9], [10.0], [10.5]])
    assert evaluation.precision_recall(ref, sam, k=1) == pytest.approx((1.0, 0.75))
    # swapping the roles swaps the numbers
    assert evaluation.precision_recall(sam, ref, k=1) == pytest.approx((0.75, 1.0))
    # k = 3 radii by hand for the reference: distances from 7 are 49, 36, 16: the 3rd is 49
    radii = evaluation.manifold_radii(torch.tensor(ref, dtype=torch.float32), k=3)
    assert radii.tolist() == pytest.approx([49.0, 36.0, 16.0, 49.0])


def test_frechet_distance_closed_form_through_the_sfid_and_dinov2_paths():
    rng = np.random.default_rng(1)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    samples = {m: (mu1, np.diag(v1)) for m in ("sfid", "fd_dinov2", "fid")}
    reference = {m: (mu2, np.diag(v2)) for m in ("sfid", "fd_dinov2", "fid")}
    out = evaluation.evaluate(samples, reference, ["sfid", "fd_dinov2", "fid"])
    for m in ("sfid", "fd_dinov2", "fid"):
        assert out[m] == pytest.approx(want, rel=1e-12)
    assert out["num_samples"] is None and out["num_reference"] is None


class GaussianRows:
    """A feature network whose features are its inputs (rows of floats)."""
    name, key, outputs = "rows", "rows", {"x": None}

    def __call__(self, batch):
        return {"x": torch.as_tensor(np.asarray(batch))}


def test_frechet_distance_of_extracted_gaussian_features_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    n = 100_000
    mu1, mu2, v1, v2 = np.zeros(3), np.array([1.0, 0, -1]), np.array([1.0, 2, 0.5]), np.array([1.0, 1, 1])
    a, b = mu1 + np.sqrt(v1) * rng.standard_normal((n, 3)), mu2 + np.sqrt(v2) * rng.standard_normal((n, 3))
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    # sampling error at n = 1e5: < 0.01 at 3 standard deviations for these moments; 0.03 is safe
    out = evaluation.evaluate(a, b, ["fd_rows"], networks={"rows": GaussianRows()}, batch_size=20_000,
                              progress=False)
    assert out["fd_rows"] == pytest.approx(want, abs=0.03)


#################################################################################
#                      Inception: the ADM evaluator's tensors                   #
#################################################################################

def test_tf1_resize_by_hand():
    # 2 -> 4: output i samples input i / 2 (no half-pixel offset), clamped: x0, (x0+x1)/2, x1, x1
    x = torch.tensor([[[[10.0, 30.0]]]])
    out = feature_nets.tf1_resize(x.expand(1, 1, 2, 2), 4)
    assert out[0, 0, 0].tolist() == pytest.approx([10, 20, 30, 30])
    # 4 -> 2 picks inputs 0 and 2 (no averaging: TF 1.x's resize_bilinear)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert feature_nets.tf1_resize(x, 2)[0, 0].tolist() == [[0, 2], [8, 10]]


def test_inception_outputs_are_the_adm_tensors_of_torchvision_forward(inception):
    """pool, spatial and logits equal, for the same preprocessed input, torchvision's Inception3
    forward of the same modules: pool = the avgpool output, spatial = Mixed_6d.branch1x1's output
    (first 7 channels, H W C order: 17 * 17 * 7 = 2023), logits = fc without its bias."""
    images = random_images(2, size=40, seed=3)
    out = inception(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (2, 2048), "spatial": (2, 2023),
                                                            "logits": (2, 1008)}
    net, seen = inception.net, {}
    hooks = [net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(spatial=o)),
             net.avgpool.register_forward_hook(lambda m, i, o: seen.update(pool=o))]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (feature_nets.tf1_resize(x, 299) - 128) / 128
    with torch.no_grad():
        logits_with_bias = net(x)
    for h in hooks:
        h.remove()
    assert seen["spatial"].shape == (2, 192, 17, 17)
    want_spatial = seen["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], want_spatial)
    torch.testing.assert_close(out["pool"], seen["pool"].flatten(1))
    torch.testing.assert_close(out["logits"], logits_with_bias - net.fc.bias, rtol=1e-4, atol=1e-4)
    assert out["pool"].std(0).mean() > 1e-3  # the random weights give features that vary


class CircularNet:
    """A random conv net with circular padding, read out as InceptionNet is (adm_outputs): exactly
    equivariant to circular shifts, so its pooled features are exactly invariant to them."""

    def __init__(self):
        torch.manual_seed(1)
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), torch.nn.Tanh(),
                                        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), torch.nn.Tanh())
        self.fc = torch.randn(10, 8)

    @torch.no_grad()
    def __call__(self, images):
        fmap = self.conv(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
        return feature_nets.adm_outputs(fmap, fmap, self.fc)


def test_sfid_sees_a_spatial_rearrangement_that_fid_does_not():
    """Rolling each image by half its size moves its content to another place: the pooled features
    (FID's) do not change, the spatial ones (sFID's) do, by about as much as another draw of images."""
    a, b = random_images(20, size=8, seed=0), random_images(20, size=8, seed=1)
    a[:, :4, :4] = 255  # a bright corner: a spatial layout shared by the set
    b[:, :4, :4] = 255
    rolled = np.roll(a, (4, 4), axis=(1, 2))
    net = CircularNet()
    fa, fb, fr = net(a), net(b), net(rolled)
    assert fa["spatial"].shape == (20, 8 * 8 * 7)

    def fd(out, f1, f2):
        return evaluation.frechet_distance(*evaluation.feature_stats(f1[out]), *evaluation.feature_stats(f2[out]))

    assert fd("pool", fa, fr) < 1e-6 * fd("pool", fa, fb)
    assert fd("spatial", fa, fr) > 0.5 * fd("spatial", fa, fb) > 0


#################################################################################
#                                     DINOv2                                    #
#################################################################################

@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    """Random ViT-S/14 DINOv2 weights in the hub checkpoint's format: 518 px positional embedding
    (1 + 37 * 37 tokens) and the training-only mask_token."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0)
    state = dict(model.state_dict(), mask_token=torch.zeros(1, model.embed_dim))
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return str(path), state


def test_dinov2_features_are_the_hub_models_cls_output(dinov2_weights):
    path, state = dinov2_weights
    net = feature_nets.DINOv2Net(path, arch="vit_small_patch14_dinov2")
    m = net.model
    assert m.pos_embed.shape == (1, 1 + 16 * 16, 384)
    # the hub model's on-the-fly resampling: bicubic, no antialias, scale (16 + 0.1) / 37
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic", antialias=False)
    torch.testing.assert_close(m.pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, -1))
    torch.testing.assert_close(m.pos_embed[:, :1], state["pos_embed"][:, :1])
    images = random_images(2, size=48, seed=4)
    out = net(images)["cls"]
    # the hub forward, written out: EDM2's preprocessing, patches + CLS + positions, blocks, norm, CLS
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = m.patch_embed(x)
        tokens = torch.cat([m.cls_token.expand(2, -1, -1), tokens.flatten(1, 2) if tokens.ndim == 4 else tokens], 1)
        tokens = tokens + m.pos_embed
        for block in m.blocks:
            tokens = block(tokens)
        want = m.norm(tokens)[:, 0]
    assert out.shape == (2, 384)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # through evaluate (the network passed in place of ViT-L): the distance of these CLS features
    fd = lambda a, b: evaluation.evaluate(a, b, ["fd_dinov2"], networks={"dinov2": net},  # noqa: E731
                                          progress=False)["fd_dinov2"]
    other = random_images(2, size=48, seed=5)
    direct = evaluation.frechet_distance(*evaluation.feature_stats(out), *evaluation.feature_stats(net(other)["cls"]))
    assert fd(images, other) == pytest.approx(direct, rel=1e-6) and direct > 1e6 * abs(fd(images, images))


#################################################################################
#                   Extraction: cache, resume, 2 processes                      #
#################################################################################

def test_reference_statistics_are_cached_and_recomputed_when_the_reference_changes(tmp_path):
    samples = random_images(12, seed=5)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(20, seed=6))
    net = TinyNet()
    run = lambda **kw: evaluation.evaluate(samples, str(ref), ["fd_tiny"], networks={"tiny": net},  # noqa: E731
                                           batch_size=8, progress=False, **kw)
    first = run()
    cache = tmp_path / "ref.npz.tiny-stats.npz"
    assert cache.is_file() and first["num_reference"] == 20 and first["num_samples"] == 12
    calls = net.calls
    again = run()
    assert net.calls == calls + 2  # the samples' 2 batches only: the reference came from the cache
    assert again["fd_tiny"] == first["fd_tiny"]
    fresh = run(cache=False)
    assert fresh["fd_tiny"] == pytest.approx(first["fd_tiny"], rel=1e-9)
    with np.load(ref) as z:  # the cached statistics are those of the reference's features
        stats = evaluation.feature_stats(net(torch.from_numpy(z["arr_0"]))["features"])
    with np.load(cache) as z:
        np.testing.assert_allclose(z["features_mu"], stats[0], rtol=1e-12)
        np.testing.assert_allclose(z["features_sigma"], stats[1], rtol=1e-12)
    np.savez(ref, arr_0=random_images(20, seed=7))  # the reference changes: recomputed
    changed = run()
    assert net.calls == calls + 2 + 5 + 1 + 5 and changed["fd_tiny"] != first["fd_tiny"]
    folder_cache = tmp_path / "named"
    run(cache=str(folder_cache))
    assert len(list(folder_cache.iterdir())) == 1


class TinyInception(TinyNet):
    """TinyNet in Inception's place (its three outputs all the same 8 features)."""
    name, outputs = "inception", {"pool": 8, "spatial": 8, "logits": 8}

    def __call__(self, batch):
        features = super().__call__(batch)["features"]
        return {o: features for o in self.outputs}


def test_folder_and_pixel_dataset_references_equal_the_npz_of_their_images(tmp_path, monkeypatch):
    from PIL import Image
    from data import ShardWriter
    images = random_images(10, seed=10)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    folder = tmp_path / "folder"
    os.makedirs(folder / "sub")
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    writer = ShardWriter(tmp_path / "pixels", "pixel", (3, 16, 16), 1, shard_size=4)
    writer.write_shard(0, np.zeros(6, np.int64), images=images[:6].transpose(0, 3, 1, 2))
    writer.write_shard(1, np.zeros(4, np.int64), images=images[6:].transpose(0, 3, 1, 2))
    writer.finish()
    samples = random_images(6, seed=11)
    fd = lambda ref: evaluation.evaluate(samples, str(ref), ["fd_tiny"], networks={"tiny": TinyNet()},  # noqa: E731
                                         progress=False, cache=False)
    want = fd(tmp_path / "ref.npz")
    # the folder is read in sorted path order (000, 002, ..., sub/001, ...): another order, the same set
    assert fd(folder)["fd_tiny"] == pytest.approx(want["fd_tiny"], rel=1e-9)
    assert fd(tmp_path / "pixels") == pytest.approx(want)
    monkeypatch.setattr(evaluation, "load_network", lambda *args: TinyInception())  # the built-in metrics' path
    for ref in (folder, tmp_path / "pixels"):
        out = evaluation.evaluate(samples, str(ref), ["fid"], progress=False, cache=False)
        assert out["fid"] == pytest.approx(want["fd_tiny"], rel=1e-6)  # float32 features: batch-dependent kernels
    Image.fromarray(random_images(1, size=8)[0]).save(folder / "zz-small.png")
    with pytest.raises(UsageError, match="zz-small.png: 8x8 pixels"):
        fd(folder)


def test_interrupted_extraction_resumes_to_the_same_features(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    images = random_images(50, seed=8)
    straight = evaluation.extract_features(TinyNet(), images, batch_size=5, chunk_size=10, progress=False)
    work = tmp_path / "chunks"
    with pytest.raises(KeyboardInterrupt):  # stopped after 7 batches: chunks 0-2 done, chunk 3 half
        evaluation.extract_features(TinyNet(fail_after=7), images, batch_size=5, chunk_size=10,
                                    work_dir=str(work), key="k", progress=False)
    assert sorted(f for f in os.listdir(work) if f.endswith(".npz")) == [f"{k:06d}.npz" for k in range(3)]
    net = TinyNet()
    capsys.readouterr()
    resumed = evaluation.extract_features(net, images, batch_size=5, chunk_size=10, work_dir=str(work),
                                          key="k", progress=True)
    assert net.calls == 4  # chunks 3 and 4 only
    log = capsys.readouterr().err  # not a terminal: plain lines, counting on from the 30 images already done
    assert "\r" not in log and "30/50" in log.splitlines()[0] and "50/50" in log.splitlines()[-1], log
    np.testing.assert_array_equal(resumed["features"], straight["features"])
    net = TinyNet()  # other images (another key): the old chunks are not used
    evaluation.extract_features(net, images, batch_size=5, chunk_size=10, work_dir=str(work), key="other",
                                progress=False)
    assert net.calls == 10


def _sharded_worker(rank, world, init_file, out_dir, work_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images = random_images(45, seed=9)
        net = TinyNet()
        on_disk = evaluation.extract_features(net, images, batch_size=4, chunk_size=8, work_dir=work_dir,
                                              key="k", progress=False)
        in_memory = evaluation.extract_features(net, images, batch_size=4, chunk_size=8, progress=False)
        np.savez(os.path.join(out_dir, f"{rank}.npz"), on_disk=on_disk["features"], in_memory=in_memory["features"],
                 calls=net.calls)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    images = random_images(45, seed=9)
    single = evaluation.extract_features(TinyNet(), images, batch_size=4, chunk_size=8, progress=False)
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path / "work")), nprocs=2)
    calls = []
    for rank in range(2):
        with np.load(tmp_path / f"{rank}.npz") as z:
            np.testing.assert_allclose(z["on_disk"], single["features"], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(z["in_memory"], single["features"], rtol=1e-6, atol=1e-7)
            calls.append(int(z["calls"]))
    # 6 chunks of 8 (the last of 5): ranks 0 and 1 take 3 each, 2 batches a chunk, twice over
    assert calls == [12, 12]


def test_in_memory_samples_with_a_work_dir_are_keyed_by_their_content(tmp_path):
    """Chunks left in work_dir by an interrupted evaluation of other samples of the same length are
    not theirs (they were keyed by None: the other samples' features came back); the same samples
    resume from them."""
    ref, a, b = random_images(20, seed=12), random_images(40, seed=13), random_images(40, seed=14)

    def run(samples, net, **kw):
        return evaluation.evaluate(samples, ref, ["fd_tiny"], networks={"tiny": net}, batch_size=2, progress=False,
                                   **kw)["fd_tiny"]

    with pytest.raises(KeyboardInterrupt):  # a's first chunk (10 batches of 2) done, the second begun
        run(a, TinyNet(fail_after=12), work_dir=str(tmp_path))
    assert os.listdir(tmp_path / "tiny")
    assert run(b, TinyNet(), work_dir=str(tmp_path)) == pytest.approx(run(b, TinyNet()), rel=1e-12)
    with pytest.raises(KeyboardInterrupt):
        run(a, TinyNet(fail_after=12), work_dir=str(tmp_path))
    net = TinyNet()
    assert run(a, net, work_dir=str(tmp_path)) == pytest.approx(run(a, TinyNet()), rel=1e-12)
    assert net.calls == 10 + 10  # a's second chunk and the reference: the first chunk came from work_dir


class FlagsSeen(TinyNet):
    """TinyNet noting the TF32 flags (matmul, cuDNN) in force when it runs."""

    def __call__(self, batch):
        self.seen = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        return super().__call__(batch)


def test_evaluation_runs_without_tf32_and_gives_the_callers_flags_back(tmp_path):
    """train.py and sample.py turn TF32 on for the process; evaluate turns it
    off while they run, as fid.py has it (and EDM2), and restore the caller's flags, also on an error."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        net = FlagsSeen()
        evaluation.evaluate(random_images(4), random_images(4, seed=1), ["fd_tiny"], networks={"tiny": net},
                            progress=False)
        assert net.seen == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        net.fail_after, net.seen = 0, None
        with pytest.raises(KeyboardInterrupt):
            evaluation.evaluate(random_images(4), random_images(4, seed=1), ["fd_tiny"], networks={"tiny": net},
                                progress=False)
        assert net.seen == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_cached_reference_is_read_without_taking_the_lock(tmp_path, monkeypatch):
    """A process that finds the cache does not wait for another one computing the statistics of some
    other reference in the same folder: it takes no lock."""
    np.savez(tmp_path / "ref.npz", arr_0=random_images(10, seed=24))
    run = lambda: evaluation.evaluate(random_images(6, seed=25), str(tmp_path / "ref.npz"), ["fd_tiny"],  # noqa: E731
                                      networks={"tiny": TinyNet()}, progress=False)["fd_tiny"]
    first = run()

    def no_lock(folder, create=False):
        raise AssertionError(f"locked {folder}")

    monkeypatch.setattr(evaluation.runs, "folder_lock", no_lock)
    assert run() == first


class SlowTinyNet(TinyNet):
    """TinyNet taking a little time per batch, so that processes started together overlap."""

    def __call__(self, batch):
        time.sleep(0.01)
        return super().__call__(batch)


def _evaluate_at_once(rank, world, init_file, start, samples, ref, out):
    import torch.distributed as dist
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start.wait()
        result = evaluation.evaluate(samples, ref, ["fd_tiny"], networks={"tiny": SlowTinyNet()}, batch_size=2,
                                     progress=False)
        with open(f"{out}-{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_processes_sharing_an_uncached_reference_and_samples_get_the_numbers_of_one(tmp_path):
    """A 2-rank torch.distributed job and a third process, started together on the same samples .npz
    and the same uncached reference, take turns at the cache and at SAMPLES-features/ (unlocked, they
    deleted each other's chunks): each gets the numbers of one process alone, and nothing is left but
    the cache."""
    data, out = tmp_path / "data", tmp_path / "out"
    os.makedirs(data)
    os.makedirs(out)
    samples, ref = str(data / "samples.npz"), str(data / "ref.npz")
    np.savez(samples, arr_0=random_images(30, seed=15))
    np.savez(ref, arr_0=random_images(50, seed=16))
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(3)
    jobs = [ctx.Process(target=_evaluate_at_once, args=(r, 2, str(out / "init"), start, samples, ref, str(out / "job")))
            for r in range(2)]
    jobs.append(ctx.Process(target=_evaluate_at_once, args=(0, 1, None, start, samples, ref, str(out / "alone"))))
    for p in jobs:
        p.start()
    for p in jobs:
        p.join(300)
    assert [p.exitcode for p in jobs] == [0, 0, 0]
    want = evaluation.evaluate(samples, ref, ["fd_tiny"], networks={"tiny": TinyNet()}, batch_size=2,
                               cache=False, progress=False)["fd_tiny"]
    for name in ("job-0", "job-1", "alone-0"):
        with open(out / f"{name}.json") as f:
            assert json.load(f)["fd_tiny"] == pytest.approx(want, rel=1e-9), name
    assert sorted(os.listdir(data)) == ["ref.npz", "ref.npz.tiny-stats.npz", "samples.npz"]


def test_a_refusal_leaves_nothing_and_an_interruption_keeps_the_finished_chunks(tmp_path):
    """A folder reference with an image of another size, read in the second chunk, is refused after
    the first chunk was written: its chunks go. Stopped (KeyboardInterrupt), the finished chunks stay
    and the rerun does only the rest."""
    from PIL import Image
    folder = tmp_path / "ref"
    os.makedirs(folder)
    for i, im in enumerate(random_images(30, seed=17)):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    Image.fromarray(random_images(1, size=8)[0]).save(folder / "zz-small.png")
    samples = random_images(6, seed=18)
    run = lambda net: evaluation.evaluate(samples, str(folder), ["fd_tiny"], networks={"tiny": net},  # noqa: E731
                                          batch_size=2, progress=False)["fd_tiny"]
    with pytest.raises(UsageError, match="zz-small.png: 8x8 pixels"):
        run(TinyNet())
    assert sorted(os.listdir(tmp_path)) == ["ref"]
    os.remove(folder / "zz-small.png")
    with pytest.raises(KeyboardInterrupt):  # the samples' 3 batches, the reference's first chunk, 2 batches
        run(TinyNet(fail_after=3 + 10 + 2))
    assert sorted(os.listdir(tmp_path / "ref.tiny-stats.npz.chunks")) == ["000000.npz", "settings.json"]
    want = evaluation.evaluate(samples, str(folder), ["fd_tiny"], networks={"tiny": TinyNet()}, cache=False,
                               progress=False)["fd_tiny"]
    net = TinyNet()
    assert run(net) == pytest.approx(want, rel=1e-12)
    assert net.calls == 3 + 5  # the samples and the reference's second chunk
    assert sorted(os.listdir(tmp_path)) == ["ref", "ref.tiny-stats.npz"]


class NaNAfter(TinyNet):
    """TinyNet whose features turn NaN from its 3rd batch on (a broken network)."""

    def __call__(self, batch):
        out = super().__call__(batch)["features"]
        return {"features": out * np.nan if self.calls >= 3 else out}


def test_non_finite_features_are_refused_not_reported_or_cached(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(30, seed=19))
    with pytest.raises(UsageError, match="ref.npz: its tiny features features hold non-finite values"):
        evaluation.evaluate(random_images(4, seed=20), str(tmp_path / "ref.npz"), ["fd_tiny"],
                            networks={"tiny": NaNAfter()}, batch_size=2, progress=False)
    assert os.listdir(tmp_path) == ["ref.npz"]
