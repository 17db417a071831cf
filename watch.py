"""What train.py shows of a run's samples while it trains: sample grids from fixed noise and labels.

Grids are drawn with DDIM (--sample-steps) and classifier-free guidance (scale 4, on all channels)
from the weights sample.py uses by default (the widest tracked power EMA, else the classic EMA);
latent samples are decoded with the VAE the dataset's manifest names. The noise and labels are
drawn once from the run's seed, so consecutive grids differ only by training, and the same seed and
weights give the same pixels.
"""
import os

import numpy as np
import torch
from PIL import Image

from data import denormalize
from diffusion import create_diffusion
from download import Fail, load_vae

GRID_COLUMNS = 8
GRID_MAX_ROWS = 10  # classes shown: all of them up to 10, else 10 spread over the label range
GRID_CFG = 4.0


def sampling_weights(ema, power_emas):
    """The weights sample.py samples from by default: the widest power EMA, else the classic EMA."""
    return power_emas[max(power_emas)] if power_emas else ema


def open_decoder(manifest):
    """(VAE or None, None) for latent data, or (None, why not) when it cannot be loaded; (None, None) for pixels."""
    if manifest["kind"] == "pixel":
        return None, None
    source = manifest.get("vae_path") if os.path.isdir(manifest.get("vae_path") or "") else manifest.get("vae")
    if not source:
        return None, "the dataset's manifest names no VAE"
    try:
        return load_vae(source), None
    except Fail as e:
        return None, str(e)


@torch.no_grad()
def generate(model, z, y, manifest, vae, diffusion, cfg_scale, batch_size=256):
    """uint8 images (N, H, W, 3), numpy, from noise z (N, C, h, w) and labels y (N,): DDIM with
    guidance (cfg_scale 1: the conditional model alone), denormalised, decoded by the VAE for latents."""
    device = next(model.parameters()).device
    out = []
    for zb, yb in zip(z.split(batch_size), y.split(batch_size)):
        zb, yb = zb.to(device), yb.to(device)
        if cfg_scale == 1:
            model_fn, kwargs = model, dict(y=yb)
        else:
            zb = torch.cat([zb, zb])
            model_fn = model.forward_with_cfg
            kwargs = dict(y=torch.cat([yb, torch.full_like(yb, model.num_classes)]), cfg_scale=cfg_scale)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            x = diffusion.ddim_sample_loop(model_fn, zb.shape, noise=zb, clip_denoised=manifest["kind"] == "pixel",
                                           model_kwargs=kwargs, device=device)[: len(yb)].float()
        images = denormalize(x, manifest)
        if manifest["kind"] == "latent":
            images = ((vae.to(device).decode(images).sample + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        out.append(images.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def grid_labels(num_classes, rows=GRID_MAX_ROWS):
    """The classes of the grid's rows: all of them, or `rows` spread evenly over [0, num_classes)."""
    if num_classes <= rows:
        return torch.arange(num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


def tile(images, rows):
    """uint8 (rows * columns, H, W, 3) -> one (rows * H, columns * W, 3) image, row-major."""
    n, h, w, c = images.shape
    return images.reshape(rows, n // rows, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, c)


class SampleGrids:
    """Grids of the same noise and labels: one row per class (grid_labels), GRID_COLUMNS columns.
    grids(model, step) writes samples/NNNNNNN.png under run_dir and returns the grid (H, W, 3)."""

    def __init__(self, run_dir, manifest, prediction, sample_steps, seed, vae=None):
        self.folder, self.manifest, self.vae = os.path.join(run_dir, "samples"), manifest, vae
        self.diffusion = create_diffusion(f"ddim{sample_steps}", prediction=prediction)
        labels = grid_labels(int(manifest["num_classes"]))
        self.rows = len(labels)
        self.y = labels.repeat_interleave(GRID_COLUMNS)
        generator = torch.Generator().manual_seed(seed)
        self.z = torch.randn(len(self.y), *manifest["shape"], generator=generator)

    def __call__(self, model, step):
        grid = tile(generate(model, self.z, self.y, self.manifest, self.vae, self.diffusion, GRID_CFG), self.rows)
        if grid.shape[0] < 64 * self.rows:  # small images: shown at twice their size
            grid = grid.repeat(2, 0).repeat(2, 1)
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{step:07d}.png")
        Image.fromarray(grid).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        return grid, path

    @classmethod
    def for_run(cls, run_dir, manifest, args, log):
        """The grids of a train.py run (args: prediction, sample_steps, seed), or None with one log
        line when latent samples cannot be decoded."""
        vae, why_not = open_decoder(manifest)
        if manifest["kind"] == "latent" and vae is None:
            log(f"no sample grids: the VAE to decode them did not load ({why_not})")
            return None
        return cls(run_dir, manifest, args.prediction, args.sample_steps, args.seed, vae)
