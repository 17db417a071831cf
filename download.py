"""Fetch what MaP-DiT needs: the Stable Diffusion VAE, the official DiT-XL/2 checkpoints, and
ImageNet (an ImageFolder or a Hugging Face dataset) encoded into the shard format of data.py.

    python download.py vae [--vae ema|mse] [--vae-path DIR]
    python download.py dit [--image-size 256|512] [--out pretrained_models]
    python download.py sit [--out pretrained_models]       # SiT-XL/2 256 px: sample.py --objective flow
    python download.py ref-batch [--image-size 64|128|256] [--out reference_batches]
    python download.py imagenet --src IMAGENET/train --out data/imagenet128 [--image-size 128]
    python download.py imagenet --src benjamin-paine/imagenet-1k-128x128 [--split train] --out data/imagenet128
    torchrun --nproc_per_node=8 download.py imagenet ...   (the shards are shared out over ranks)

The `imagenet` command lives in imagenet.py (its sources, the ADM crop and the encoder; resumable).
"""
import argparse
import os
import sys
import urllib.error
import urllib.request
import warnings

import numpy as np
import torch

from cli import ArgumentParser, UsageError, at_least, one_line, run_command
from eval_inputs import Side
from models import DiT_models
from progress import progress

VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
OFFICIAL_URLS = {  # the official XL/2 checkpoints by family and image size (SiT's, from its download.py)
    "DiT": {size: f"https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{size}x{size}.pt" for size in (256, 512)},
    "SiT": {256: "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                 "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"},
}
REF_BATCH_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{0}/"
                 "VIRTUAL_imagenet{0}_labeled.npz")  # ADM's ImageNet reference batches (fid.py REFERENCE)


def load_vae(name_or_path):
    """An AutoencoderKL in eval mode from a directory written by save_pretrained, or from a hub id
    (the Hugging Face cache first, then a download). Raises UsageError when that does not work."""
    from diffusers import AutoencoderKL  # a slow import: only where a VAE is needed
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging
    diffusers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    local = os.path.isdir(name_or_path)
    for options in [{}] if local else [{"local_files_only": True}, {}]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vae = AutoencoderKL.from_pretrained(name_or_path, **options)
            return vae.eval().requires_grad_(False)
        except (OSError, ValueError, RuntimeError) as e:
            error = e
    if local:
        raise UsageError(f"{name_or_path}: not an AutoencoderKL saved by save_pretrained "
                   f"({one_line(error)})")
    raise UsageError(f"VAE {name_or_path} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
               f"and could not be downloaded; run `python download.py vae` where there is internet "
               f"and copy that cache here (or point HF_HOME at it), or pass --vae-path DIR with a "
               f"copy saved by save_pretrained")


def open_decoder(manifest, vae_path=None):
    """The VAE that decodes samples of a latent dataset (None for pixel data): from vae_path, else the
    folder the manifest names when it exists, else the manifest's hub id. Raises UsageError naming why not."""
    if manifest["kind"] != "latent":
        return None
    saved = manifest.get("vae_path")
    source = vae_path or (saved if saved and os.path.isdir(saved) else manifest.get("vae"))
    if not source:
        raise UsageError("the dataset's manifest names no VAE; pass --vae-path DIR (a save_pretrained folder)")
    vae = load_vae(source)
    if vae.config.latent_channels != manifest["shape"][0]:
        raise UsageError(f"{source}: the VAE has {vae.config.latent_channels} latent channels, the data "
                   f"{manifest['shape'][0]}; pass the data's VAE with --vae-path DIR")
    return vae


def vae_source(args):
    if args.vae_path and not os.path.isdir(args.vae_path):
        raise UsageError(f"--vae-path {args.vae_path}: not a directory")
    return args.vae_path or VAES[args.vae]


def cmd_vae(args):
    """Make sure the VAE is at hand (downloading it into the Hugging Face cache) and say where."""
    from huggingface_hub import try_to_load_from_cache
    source = vae_source(args)
    vae = load_vae(source)
    where = args.vae_path or os.path.dirname(try_to_load_from_cache(source, "config.json"))
    print(f"{source}: AutoencoderKL with {vae.config.latent_channels} latent channels, at {where}")


def fetch(url, part, show_progress=True):
    """Stream url into the file part, resuming it with an HTTP Range request if it exists (when
    the server ignores the range, it sends everything and part is rewritten)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past the end: part is complete (verified next)
            return
        raise UsageError(f"{url}: HTTP {e.code} {e.reason}")
    except OSError as e:
        raise UsageError(f"{url}: cannot download ({getattr(e, 'reason', e)}); fetch it where there is "
                   f"internet and put it at {part.removesuffix('.part')}")
    with response:
        have = have if response.status == 206 else 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        try:
            with open(part, "ab" if have else "wb") as f, progress(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=os.path.basename(part), enabled=show_progress) as bar:
                while chunk := response.read(1 << 20):
                    bar.update(f.write(chunk))
        except OSError as e:
            raise UsageError(f"{url}: download broke off ({e}); run again to resume it")
    if total is not None and os.path.getsize(part) != total:
        raise UsageError(f"{url}: got {os.path.getsize(part)} of {total} bytes; run again to resume")


def dit_keys():
    """The 292 keys of the official DiT-XL/2 (and SiT-XL/2: SiT's model is DiT's) state dict: those of this
    repository's vanilla DiT-XL/2."""
    with torch.device("meta"):  # no memory, no initialisation
        return frozenset(DiT_models["DiT-XL/2"]().state_dict())


def read_official(path):
    """The state dict of an official DiT or SiT checkpoint (a training checkpoint of theirs keeps it under "ema")."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["ema"] if isinstance(state, dict) and isinstance(state.get("ema"), dict) else state


def verify_dit(path, image_size):
    """Check that path holds a DiT-XL/2 (or SiT-XL/2) state dict for image_size: it loads with torch.load
    (weights_only), has exactly the 292 DiT-XL/2 keys, and pos_embed is (1, (size/16)^2, 1152)."""
    try:
        state = read_official(path)
    except Exception as e:  # unpickling errors come in many types
        raise UsageError(f"{path}: does not load as a checkpoint ({one_line(e)}); delete it, run again")
    keys, want_keys = set(state) if isinstance(state, dict) else set(), dit_keys()
    want = (1, (image_size // 16) ** 2, 1152)
    if keys != want_keys:
        problem = (f"not a DiT-XL/2 state dict ({len(keys)} keys; missing {sorted(want_keys - keys)[:3]}, "
                   f"unexpected {sorted(keys - want_keys)[:3]})")
    elif tuple(state["pos_embed"].shape) != want:
        problem = f"pos_embed is {tuple(state['pos_embed'].shape)}, want {want} for {image_size} px"
    else:
        return
    raise UsageError(f"{path}: {problem}; delete it, run again")


def get_file(dest, url, verify, show_progress=True):
    """verify(dest)'s result, dest downloaded from url first if needed through a .part file that a later
    call resumes; only a verified file gets the final name."""
    if os.path.exists(dest):
        return verify(dest)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fetch(url, dest + ".part", show_progress)
    try:
        result = verify(dest + ".part")
    except UsageError:
        os.remove(dest + ".part")  # complete but wrong: start afresh next time
        raise
    os.replace(dest + ".part", dest)
    return result


def get_dit(image_size, out_dir, url=None, show_progress=True, family="DiT"):
    """Path of the verified DiT-XL/2 (family "SiT": SiT-XL/2) checkpoint for image_size in out_dir
    (downloaded if needed)."""
    path = os.path.join(out_dir, f"{family}-XL-2-{image_size}x{image_size}.pt")
    get_file(path, url or OFFICIAL_URLS[family][image_size], lambda p: verify_dit(p, image_size), show_progress)
    return path


def cmd_dit(args):
    """Download (or reuse) and verify the official DiT-XL/2 or SiT-XL/2 checkpoint."""
    family = {"dit": "DiT", "sit": "SiT"}[args.command]
    path = get_dit(args.image_size, args.out, show_progress=not args.no_progress, family=family)
    usage = " --objective flow" if family == "SiT" else ""
    print(f"{family}-XL/2 {args.image_size} px checkpoint verified: {path}\n"
          f"sample it: python sample.py --ckpt {path}{usage} --image-size {args.image_size} --class-label 207 360")


def verify_ref_batch(path, image_size):
    """Check that path is ADM's reference batch for image_size: arr_0 uint8 (N, size, size, 3), and
    the precomputed Inception statistics mu (2048), sigma (2048 x 2048), mu_s (2023), sigma_s."""
    try:
        side = Side(path, "reference batch")
    except UsageError as e:
        raise UsageError(f"{e}; delete it, run again")
    problems = [] if side.image_shape == (image_size, image_size, 3) else [f"arr_0 images {side.image_shape}"]
    for metric, d in (("fid", 2048), ("sfid", 2023)):
        mu, sigma = side.stats.get(metric, (np.zeros(0), np.zeros(0)))
        if mu.shape != (d,) or sigma.shape != (d, d):
            problems.append(f"{metric} statistics {mu.shape}, {sigma.shape}")
    if problems:
        raise UsageError(f"{path}: not ADM's {image_size} px reference batch ({'; '.join(problems)}); delete it, run again")
    return len(side)


def cmd_ref_batch(args):
    """Download (or reuse) and verify ADM's ImageNet reference batch."""
    url = REF_BATCH_URL.format(args.image_size)
    path = os.path.join(args.out, os.path.basename(url))
    count = get_file(path, url, lambda p: verify_ref_batch(p, args.image_size), not args.no_progress)
    print(f"ADM reference batch, {count} images of {args.image_size} px "
          f"with mu, sigma, mu_s, sigma_s, verified: {path}")


def cmd_imagenet(args):
    import imagenet  # imagenet.py imports this module (the VAE): here, not at the top
    imagenet.cmd_imagenet(args)


def build_parser():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{vae,dit,sit,ref-batch,imagenet}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bar (with the output redirected, the bar is a plain line every 30 s)")

    def command(name, run, help, vaes=None, **kwargs):
        p = commands.add_parser(name, parents=[common], help=help, **kwargs)
        p.set_defaults(run=run)
        if vaes:
            p.add_argument("--vae", choices=vaes, default="ema", help="stabilityai/sd-vae-ft-ema or -mse (default: ema)")
            p.add_argument("--vae-path", metavar="DIR", help="load the VAE from this save_pretrained directory, not "
                           "the Hugging Face cache (the manifest still records --vae)")
        return p

    command("vae", cmd_vae, "download the SD VAE into the Hugging Face cache", ["ema", "mse"])
    p = command("dit", cmd_dit, "download and verify an official DiT-XL/2 checkpoint")
    p.add_argument("--image-size", type=int, choices=[256, 512], default=256)
    p.add_argument("--out", default="pretrained_models", help="folder (default: pretrained_models)")
    p = command("sit", cmd_dit, "download and verify SiT's official SiT-XL/2 checkpoint (flow matching, 256 px)")
    p.add_argument("--image-size", type=int, choices=[256], default=256)
    p.add_argument("--out", default="pretrained_models", help="folder (default: pretrained_models)")
    p = command("ref-batch", cmd_ref_batch, "download and verify ADM's ImageNet reference batch (for fid.py)")
    p.add_argument("--image-size", type=int, choices=[64, 128, 256], default=128,
                   help="the resolution of the samples it will score (default: 128, this repository's ImageNet)")
    p.add_argument("--out", default="reference_batches", help="folder (default: reference_batches)")
    p = command("imagenet", cmd_imagenet, "encode an ImageFolder or a Hugging Face dataset into the data.py format "
                "(resumable)", ["ema", "mse", "none"], description="Encode an ImageFolder (one sub-folder per class, "
                "in sorted order) or a Hugging Face dataset (its rows in order; the class names from its ClassLabel) "
                "into the data.py format: ADM centre crop, then the SD VAE posterior mean and std (float16), or uint8 "
                "pixels with --vae none. Unreadable images are skipped and counted. Run it again to resume. Under "
                "torchrun, shard i goes to rank i % world size; a streamed Hub dataset is read by every rank.")
    p.add_argument("--src", required=True, help="an ImageFolder (e.g. ILSVRC2012/train), a folder written by "
                   "datasets' save_to_disk, a folder, file or glob of parquet files, or a Hub dataset id (streamed), "
                   "e.g. benjamin-paine/imagenet-1k-128x128")
    p.add_argument("--split", default="train", help="the split of a Hugging Face dataset (default: train)")
    p.add_argument("--image-column", metavar="NAME", help="a Hugging Face dataset's image column (default: its "
                   "Image feature, else a column named image or img)")
    p.add_argument("--label-column", metavar="NAME", help="a Hugging Face dataset's class column, a ClassLabel or "
                   "integers (default: its ClassLabel feature, else a column named label or labels)")
    p.add_argument("--out", required=True, help="dataset folder to write (or resume)")
    p.add_argument("--image-size", type=at_least(1), default=128, help="pixels (default: 128)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="images per VAE batch")
    p.add_argument("--flip", action="store_true", help="also store each image's mirror image as the item after it, "
                   "encoded by the VAE (the flip of a latent is not the latent of the flipped image); doubles the dataset")
    p.add_argument("--bf16", action="store_true", help="run the VAE encoder under bf16 autocast (default float32, as "
                   "DiT and EDM2 encode): faster on a GPU, but bf16 keeps 8 significant bits, coarser than the float16 "
                   "(11 bits) that is stored")
    p.add_argument("--num-workers", type=at_least(0), default=min(8, os.cpu_count() or 1),
                   help="image decoding processes (default: min(8, CPUs))")
    p.add_argument("--shard-size", type=at_least(1), default=10000, help="images per shard")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


def cli(argv=None):
    """download.py as a command: 0; bad input one line and 2; interrupted 130 (run it again to resume)."""
    return run_command("download.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
