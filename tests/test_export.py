"""Tests of export.py and of loading its folders (sample.py --ckpt, --guide, Hub ids), offline: tiny runs
trained in-process on 8x8 pixels, huggingface_hub's download replaced by a local folder."""
import json
import math
import os
import shutil

import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError
import numpy as np
import pytest
import torch

import export
import models
import sample
import test_sample
from data import ShardWriter
from models import MP_SWITCHES
from test_sample import load, run_cli, train_run

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # in diffusers
              pytest.mark.usefixtures("one_thread")]
GRID = ["--class-label", 0, 3, "--num-samples", 2, "--sampler", "ddim", "--num-sampling-steps", 3]
NAMES = ["ant", "bee", "cat", "dog"]
pixel_run = test_sample.pixel_run  # its fixture: a MaP run (v-prediction), checkpoints at steps 3 and 6


def export_cli(argv, capsys):
    code = export.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.fixture(scope="module")
def named_pixels(tmp_path_factory):
    """8x8x3 pixel data, 4 named classes."""
    root = tmp_path_factory.mktemp("named")
    writer = ShardWriter(root, "pixel", (3, 8, 8), 4)
    writer.write_shard(0, np.arange(16) % 4,
                       images=np.random.default_rng(1).integers(0, 256, (16, 3, 8, 8), dtype=np.uint8))
    writer.finish(class_names=NAMES, source="test pixels")
    return str(root)


@pytest.fixture(scope="module")
def some_switches_run(named_pixels, tmp_path_factory):
    """One step of a model with some MP switches on and others off, rotation modulation, x0-prediction."""
    return train_run(named_pixels, tmp_path_factory.mktemp("switches"), "--depth", "2", "--hidden-size", "64",
                     "--num-heads", "2", "--num-steps", "1", "--ckpt-every", "1", "--sample-every", "0",
                     "--use-cosine-attention", "--use-weight-normalization", "--use-mp-silu",
                     "--use-mp-embedding", "--modulation", "rotation", "--prediction", "x0")


@pytest.fixture(scope="module")
def vanilla_ckpt(tmp_path_factory):
    """A checkpoint of a vanilla DiT-XS/2 run (depth 2, width 64) on 8x8x4 latents of 1000 classes (16
    tokens; DiTPipeline's null class is 1000) whose raw weights are all replaced by random values, so
    that no zero-initialised layer hides a wrong mapping."""
    root = tmp_path_factory.mktemp("vanilla")
    writer = ShardWriter(root / "data", "latent", (4, 8, 8), 1000)
    rng = np.random.default_rng(0)
    writer.write_shard(0, np.arange(16) * 61 % 1000, mean=rng.normal(size=(16, 4, 8, 8)).astype(np.float16),
                       std=np.full((16, 4, 8, 8), 0.1, np.float16))
    writer.finish(vae="stabilityai/sd-vae-ft-ema")
    run = train_run(str(root / "data"), root / "results", "--model", "DiT-XS/2", "--depth", "2", "--hidden-size",
                    "64", "--num-heads", "2", "--num-steps", "1", "--ckpt-every", "1", "--sample-every", "0")
    path = os.path.join(run, "checkpoints", "0000001.pt")
    ckpt, generator = load(path), torch.Generator().manual_seed(0)
    ckpt["model"] = {k: v if k == "pos_embed" else 0.2 * torch.randn(v.shape, generator=generator)
                     for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    return path


def test_an_export_samples_what_its_run_samples(pixel_run, tmp_path, capsys):
    """The grid of an export is the run's grid with the same --weights, byte for byte (tracked, post hoc
    and raw), and so is autoguidance with the export as the guide."""
    for weights in ("ema-0.1", "ema-0.07", "raw"):
        folder = tmp_path / weights
        code, out, err = export_cli([pixel_run, "--weights", weights, "--out", folder], capsys)
        assert code == 0 and f"wrote {folder}" in out, err
        assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
        run, exported = tmp_path / f"run-{weights}.png", tmp_path / f"export-{weights}.png"
        assert run_cli(["--result-dir", pixel_run, "--weights", weights, *GRID, "--out", run], capsys)[0] == 0
        code, out, err = run_cli(["--ckpt", folder, *GRID, "--out", exported], capsys)
        assert code == 0 and f"{weights} weights of step 6 exported to {folder}" in out, err
        assert run.read_bytes() == exported.read_bytes()
    guided = ["--result-dir", pixel_run, "--weights", "raw", *GRID, "--cfg-scale", 2]
    assert run_cli([*guided, "--guide", pixel_run, "--guide-weights", "ema-0.07", "--out", tmp_path / "g1.png"],
                   capsys)[0] == 0
    assert run_cli([*guided, "--guide", tmp_path / "ema-0.07", "--out", tmp_path / "g2.png"], capsys)[0] == 0
    assert (tmp_path / "g1.png").read_bytes() == (tmp_path / "g2.png").read_bytes()
    assert (tmp_path / "g1.png").read_bytes() != (tmp_path / "run-raw.png").read_bytes()  # the guide acted


def test_the_config_round_trips_every_switch(some_switches_run, tmp_path, capsys):
    path = sample.checkpoint_file(some_switches_run, "RUN")
    ckpt = load(path)
    trained, *_ = sample.run_model(ckpt, path, "raw")
    assert export_cli([some_switches_run, "--weights", "raw", "--out", tmp_path / "e"], capsys)[0] == 0
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    switches = trained.switches.as_dict()
    assert 0 < sum(switches.values()) < len(MP_SWITCHES)  # some on, some off: the test tells them apart
    assert {k: config["architecture"][k] for k in MP_SWITCHES} == switches == {k: ckpt["args"][k] for k in MP_SWITCHES}
    assert config["architecture"] == {"model": "DiT-XS/4", "depth": 2, "hidden_size": 64, "num_heads": 2,
                                     "patch_size": 4, "mp": False, "modulation": "rotation",
                                     "learn_sigma": True, **switches}
    assert (config["format"], config["objective"], config["prediction"], config["weights"], config["step"]) == \
        (sample.EXPORT_FORMAT, "ddpm", "x0", "raw", 1)
    assert config["data"] == {k: ckpt["manifest"][k] for k in export.DATA_KEYS}
    assert config["data"]["class_names"] == NAMES and config["data"]["shape"] == [3, 8, 8]
    model, manifest, _, stem, prediction = sample.load_model(sample.parse_args(["--ckpt", str(tmp_path / "e"),
                                                                                "--class-label", "0"]))
    assert model.switches.as_dict() == switches and model.modulation == "rotation" and prediction == "x0"
    assert manifest["class_names"] == NAMES and stem == os.path.join("samples", "e-raw")
    for name, tensor in trained.state_dict().items():  # the MP Fourier features' random buffers too
        assert torch.equal(model.state_dict()[name], tensor), name

    ckpt["args"].update(objective="flow", time_dist="logit-normal", logit_mean=0.0, logit_std=1.0)
    torch.save(ckpt, tmp_path / "flow.pt")
    assert export_cli([tmp_path / "flow.pt", "--weights", "raw", "--out", tmp_path / "flow"], capsys)[0] == 0
    config = json.loads((tmp_path / "flow" / "config.json").read_text())
    assert {k: config[k] for k in sample.OBJECTIVE_KEYS} == {"objective": "flow", "time_dist": "logit-normal",
                                                            "logit_mean": 0.0, "logit_std": 1.0}


def test_the_model_card_says_how_the_run_trained_and_its_evaluations(pixel_run, tmp_path, capsys):
    run = shutil.copytree(pixel_run, tmp_path / "run")
    assert export_cli([run, "--out", tmp_path / "plain"], capsys)[0] == 0
    card = (tmp_path / "plain" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: map-dit\ntags:\n") and "- magnitude-preserving" in card
    assert "6 steps at batch 8" in card and "Weights: ema-0.1 at step 6" in card  # the default: sample.py's
    assert "None: the run recorded no evaluation" in card and "pixels scaled from [0, 255] to [-1, 1]" in card
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        for step, fid in ((3, 81.25), (9, 1.0)):  # step 9 lies past the exported checkpoint
            f.write(json.dumps({"step": step, "eval": {"fid": fid, "is": 2.5}, "samples": 64}) + "\n")
    assert export_cli([run, "--out", tmp_path / "evaluated"], capsys)[0] == 0
    card = (tmp_path / "evaluated" / "README.md").read_text()
    assert "| step | samples | fid | is |" in card and "| 3 | 64 | 81.25 | 2.5 |" in card and "| 9 |" not in card


def diffusers_sinusoid(t, dim, max_period=10000):
    """diffusers' DiT timestep features (Timesteps with downscale_freq_shift=1): DiT's [cos, sin] with
    frequencies max_period^(-i / (half - 1)) instead of max_period^(-i / half), the same float32 steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_a_vanilla_export_is_diffusers_dit(vanilla_ckpt, tiny_vae, tmp_path, capsys, monkeypatch):
    """DiTTransformer2DModel.from_pretrained of --diffusers gives this repository's forward on random
    weights and inputs (every label, the null one too), once both embed the timestep alike: diffusers
    uses frequencies 10000^(-i/127) where DiT uses 10000^(-i/128), so at t = 0 (cos 1, sin 0 for every
    frequency) the outputs agree as they are, and at other t with DiT's sinusoid swapped for diffusers'.
    Tolerance 2e-6 absolute, the outputs' RMS being ~6.5: here the two agree bit for bit (the same
    float32 products; q, k, v as three matmuls give what one qkv matmul gives), and 2e-6 leaves a few
    ulps for a BLAS that sums in another order. The subtlest wrong conversion, diffusers' default
    LayerNorm eps 1e-5 in place of DiT's 1e-6, moves outputs by 4e-6 to 6e-6; a swapped k and v by ~10."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    code, out, err = export_cli([vanilla_ckpt, "--weights", "raw", "--diffusers", "--out", tmp_path / "d"], capsys)
    assert code == 0, err
    card = (tmp_path / "d" / "README.md").read_text()
    assert "library_name: diffusers" in card and "AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema')" in card
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path / "d").eval()
    ours, *_ = sample.load_model(sample.parse_args(["--ckpt", vanilla_ckpt, "--weights", "raw", "--class-label", "0"]))
    ours.eval()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, 8, 8, generator=generator), torch.tensor([0, 1, 500, 999, 1000])  # 1000: null
    t = torch.randint(1, 1000, (5,), generator=generator)
    with torch.no_grad():
        at_zero = [m(x, torch.zeros_like(t), y) for m in (ours, lambda *a: theirs(*a).sample)]
        monkeypatch.setattr(models, "timestep_embedding", diffusers_sinusoid)
        at_t = [m(x, t, y) for m in (ours, lambda *a: theirs(*a).sample)]
    assert at_t[0].std() > 1  # the random weights reach the output
    torch.testing.assert_close(at_zero[1], at_zero[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(at_t[1], at_t[0], rtol=0, atol=2e-6)

    vae = AutoencoderKL.from_pretrained(tiny_vae(levels=4, channels=(8,) * 4, layers_per_block=1))  # downsampling 8
    pipe = DiTPipeline(transformer=theirs, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_bad_exports_and_flags_are_one_line_and_exit_2(pixel_run, tmp_path, capsys):
    assert export_cli([pixel_run, "--weights", "raw", "--out", tmp_path / "e"], capsys)[0] == 0
    no_config = shutil.copytree(tmp_path / "e", tmp_path / "no-config")
    os.remove(no_config / "config.json")
    newer = shutil.copytree(tmp_path / "e", tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "format": sample.EXPORT_FORMAT + 1}))
    partial = shutil.copytree(tmp_path / "e", tmp_path / "partial")
    del config["architecture"]["use_mp_silu"]
    (partial / "config.json").write_text(json.dumps(config))
    torn = shutil.copytree(tmp_path / "e", tmp_path / "torn")
    (torn / "model.safetensors").write_bytes((torn / "model.safetensors").read_bytes()[:100])
    grid = ["--class-label", 0]
    for argv, needle in ((["--ckpt", no_config, *grid], "no config.json"),
                         (["--ckpt", newer, *grid], f"format {sample.EXPORT_FORMAT + 1} is newer than this code"),
                         (["--ckpt", torn, *grid], "cannot read model.safetensors"),
                         (["--ckpt", partial, *grid], "no use_mp_silu: not a complete export.py config"),
                         (["--ckpt", tmp_path / "e", "--weights", "raw", *grid], "--weights raw: "
                          f"{tmp_path / 'e'} is an export of one set of weights (raw of step 6); drop the flag"),
                         (["--result-dir", pixel_run, "--guide", tmp_path / "e", "--guide-weights", "ema", *grid],
                          "--guide-weights ema: "),
                         (["--result-dir", pixel_run, "--guide", newer, *grid], "--guide: "),
                         (["--ckpt", tmp_path, *grid], "no checkpoints/NNNNNNN.pt and no model.safetensors")):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
    for argv, needle in (([pixel_run, "--out", tmp_path / "e"], "not an empty folder"),
                         ([pixel_run, "--diffusers", "--out", tmp_path / "d"], "needs this repository"),
                         ([pixel_run, "--weights", "ema-x", "--out", tmp_path / "x"], "ema-<sigma_rel>"),
                         ([tmp_path / "e", "--out", tmp_path / "x"], "no checkpoints/NNNNNNN.pt")):
        code, _, err = export_cli(argv, capsys)
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "x")


def test_a_hub_id_is_fetched_by_snapshot_download(pixel_run, tmp_path, capsys, monkeypatch):
    assert export_cli([pixel_run, "--weights", "raw", "--out", tmp_path / "e"], capsys)[0] == 0
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id != "someone/tiny-map-dit":
            raise LocalEntryNotFoundError("offline")
        return str(tmp_path / "e")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # the default output lands under ./samples
    assert run_cli(["--ckpt", "someone/tiny-map-dit", *GRID], capsys)[0] == 0
    assert run_cli(["--ckpt", tmp_path / "e", *GRID, "--out", "local.png"], capsys)[0] == 0
    hub = tmp_path / "samples" / "tiny-map-dit-raw-ddim3-cfg4-seed0.png"
    assert hub.read_bytes() == (tmp_path / "local.png").read_bytes()
    assert calls == [("someone/tiny-map-dit", {"allow_patterns": ["model.safetensors", "config.json", "README.md"]})]
    assert run_cli(["--result-dir", pixel_run, *GRID, "--guide", "someone/tiny-map-dit", "--out", "g.png"],
                   capsys)[0] == 0
    fid = ["--fid", 3, "--sampler", "ddim", "--num-sampling-steps", 3, "--no-progress"]
    assert run_cli(["--ckpt", "someone/tiny-map-dit", *fid, "--out", "hub.npz"], capsys)[0] == 0
    assert run_cli(["--result-dir", pixel_run, "--weights", "raw", *fid, "--out", "run.npz"], capsys)[0] == 0
    np.testing.assert_array_equal(np.load("hub.npz")["arr_0"], np.load("run.npz")["arr_0"])
    code, _, err = run_cli(["--ckpt", "someone/missing", *GRID], capsys)
    assert code == 2 and "no Hub repository of that id could be fetched (LocalEntryNotFoundError)" in err
    assert len(err.splitlines()) == 1
