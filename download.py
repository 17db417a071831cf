"""Fetch what MaP-DiT needs: the Stable Diffusion VAE, the official DiT-XL/2 checkpoints, and
ImageNet (an ImageFolder or a Hugging Face dataset) encoded into the shard format of data.py.

    python download.py vae [--vae ema|mse] [--vae-path DIR]
    python download.py dit [--image-size 256|512] [--out pretrained_models]
    python download.py sit [--out pretrained_models]       # SiT-XL/2 256 px: sample.py --objective flow
    python download.py ref-batch [--image-size 64|128|256] [--out reference_batches]
    python download.py imagenet --src IMAGENET/train --out data/imagenet128 [--image-size 128]
    python download.py imagenet --src benjamin-paine/imagenet-1k-128x128 [--split train] --out data/imagenet128
    torchrun --nproc_per_node=8 download.py imagenet ...   (the shards are shared out over ranks)

`imagenet --src` is an ImageFolder, or a dataset read with the `datasets` library: a save_to_disk folder,
a folder (the Hub's layout), file or glob of parquet files, or a Hub id (streamed; see HubRows). Item k
is the k-th image (of the sorted ImageFolder, or row k of the split) and shard i holds items
[i * shard_size, (i + 1) * shard_size) whatever the source and the number of ranks.
`imagenet` resumes: the same command again keeps finished shards (data.ChunkFolder refuses other options).
"""
import argparse
import functools
import glob
import hashlib
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from cli import (LONG_WAIT, ArgumentParser, UsageError, at_least, barrier, my_chunks, one_line, run_command,
                 setup_distributed)
from data import ARRAYS, ChunkFolder, ShardWriter, atomic_write, read_json
from eval_inputs import IMAGE_EXTENSIONS, Side, image_files
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


def _vae_source(args):
    if args.vae_path and not os.path.isdir(args.vae_path):
        raise UsageError(f"--vae-path {args.vae_path}: not a directory")
    return args.vae_path or VAES[args.vae]


def cmd_vae(args):
    """Make sure the VAE is at hand (downloading it into the Hugging Face cache) and say where."""
    from huggingface_hub import try_to_load_from_cache
    source = _vae_source(args)
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


def center_crop_arr(image, size):
    """ADM's centre crop of an RGB PIL image to a (size, size, 3) uint8 array: halve it with a box
    filter while the short side is at least 2 * size, resize it (bicubic) so that the short side
    is size, then cut out the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


def list_images(src):
    """(path, label) of every image under src/<class>/ (eval_inputs.image_files), and the class names: the
    sorted sub-folder names, a class's label being its position."""
    if not os.path.isdir(src):
        raise UsageError(f"--src {src}: not a directory; give an ImageFolder (one sub-folder per class)")
    classes = sorted(entry.name for entry in os.scandir(src) if entry.is_dir())
    items = [(f, label) for label, name in enumerate(classes) for f in image_files(os.path.join(src, name))]
    if not items:
        raise UsageError(f"--src {src}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")
    return items, classes


class ImageFolderItems:
    """The images of an ImageFolder (list_images) as a source of cmd_imagenet: count, num_classes,
    class_names, settings (for ChunkFolder), manifest (for ShardWriter.finish) and shards()."""

    def __init__(self, src):
        self.items, self.class_names = list_images(src)
        self.count, self.num_classes = len(self.items), len(self.class_names)
        listing = "".join(f"{label} {os.path.relpath(p, src)}\n" for p, label in self.items)
        self.settings = {"images_sha256": hashlib.sha256(listing.encode()).hexdigest()}
        self.manifest = {"source": os.path.abspath(src)}

    def shards(self, todo, size):
        """(i, items of shard i) for i in todo, an item being (name, path, label)."""
        for i in todo:
            yield i, [(path, path, label) for path, label in self.items[i * size:(i + 1) * size]]


HUB_IMAGE_NAMES, HUB_LABEL_NAMES = ("image", "img", "jpg", "png"), ("label", "labels", "cls", "class")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _kind(feature):
    """A feature's type as a word: Image, ClassLabel, int64, string, List, ..."""
    return getattr(feature, "dtype", None) if type(feature).__name__ == "Value" else type(feature).__name__


def hub_columns(features, image_column=None, label_column=None):
    """(image column, label column) of a dataset's features: those given, else the Image and the
    ClassLabel feature (one named like image / label where there are several), else a column named
    so. UsageError, naming the columns and the flag, where one is missing or of the wrong kind: an
    image column is an Image feature, a label column a ClassLabel or integers."""
    from datasets import ClassLabel, Image
    found = ", ".join(f"{name} ({_kind(f)})" for name, f in features.items())

    def pick(given, flag, kind, names, missing):
        if given and given not in features:
            raise UsageError(f"{flag} {given}: no such column; the columns are {found}")
        typed = [c for c, f in features.items() if isinstance(f, kind)]
        named = [c for c in features if c.lower() in names]
        column = given or next((c for c in typed if c in named), None) or (typed + named or [None])[0]
        if column is None:
            raise UsageError(f"{missing} among the columns {found}; name it with {flag}")
        return column

    image = pick(image_column, "--image-column", Image, HUB_IMAGE_NAMES, "no image column")
    label = pick(label_column, "--label-column", ClassLabel, HUB_LABEL_NAMES,
                 "no label column (an unlabeled dataset cannot train a class-conditional model)")
    if not isinstance(features[image], Image):
        raise UsageError(f"column {image} holds {_kind(features[image])}, not images (the columns are {found}); "
                         f"name the image column with --image-column")
    if not (isinstance(features[label], ClassLabel) or str(_kind(features[label])).startswith(("int", "uint"))):
        raise UsageError(f"column {label} holds {_kind(features[label])}, not class labels (the columns are "
                         f"{found}); name the label column (a ClassLabel or integers) with --label-column")
    return image, label


def parquet_files(src, split):
    """The parquet files of split in src: a file, a glob, or a folder laid out as on the Hub (the split
    in the file names, as datasets resolves them), sorted, with their row counts (from their footers)."""
    if os.path.isdir(src):
        from datasets.data_files import DataFilesDict, get_data_patterns
        splits = DataFilesDict.from_patterns(get_data_patterns(src), src)
        if split not in splits:
            raise UsageError(f"--split {split}: {src} has the splits {', '.join(splits)}")
        files = sorted(f for f in splits[split] if f.endswith(".parquet"))
    else:
        files = sorted(glob.glob(src))
    if not files or not all(f.endswith(".parquet") for f in files):
        raise UsageError(f"--src {src}: no parquet files of split {split} ({', '.join(files[:2]) or 'none'}); give "
                         f"an ImageFolder, a save_to_disk folder, parquet files or a Hub id")
    import pyarrow.parquet as pq
    rows = []
    for f in files:
        try:
            rows.append(pq.read_metadata(f).num_rows)
        except Exception as e:  # pyarrow raises OSError or ValueError subclasses
            raise UsageError(f"{f}: not a readable parquet file ({one_line(e)})")
    return files, rows


def open_hub(src, split):
    """(dataset, row count, split read) of src, split: a save_to_disk folder as a map-style Dataset
    (memory-mapped arrow, read by random access; one saved Dataset has no split); parquet files or a
    Hub id as a streamed IterableDataset."""
    import datasets
    if os.path.isfile(os.path.join(src, "state.json")) or os.path.isfile(os.path.join(src, "dataset_dict.json")):
        ds = datasets.load_from_disk(src)
        if not isinstance(ds, datasets.DatasetDict):
            return ds, len(ds), None
        if split not in ds:
            raise UsageError(f"--split {split}: {src} has the splits {', '.join(ds)}")
        return ds[split], len(ds[split]), split
    if os.path.exists(src) or glob.has_magic(src):
        files, rows = parquet_files(src, split)
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
        return ds, sum(rows), split
    if not HUB_ID.fullmatch(src):
        raise UsageError(f"--src {src}: no such file or folder, and not a Hub id (owner/name)")
    try:
        ds = datasets.load_dataset(src, split=split, streaming=True)
    except Exception as e:  # the Hub client and the builders raise many types
        raise UsageError(f"--src {src} --split {split}: not a local path, and cannot load it from the Hugging Face "
                         f"Hub ({one_line(e)})")
    splits = ds.info.splits or {}
    if split not in splits or not splits[split].num_examples:
        raise UsageError(f"--src {src}: the Hub dataset does not say how many rows its split {split} has (no "
                         f"dataset_info in its card), which sharding needs; download it (hf download {src} "
                         f"--repo-type dataset --local-dir DIR) and pass --src DIR")
    return ds, splits[split].num_examples, split


class HubRows:
    """The rows of a Hugging Face dataset (open_hub) as a source of cmd_imagenet, with the same
    attributes and shards() as ImageFolderItems. The image column is read undecoded (its encoded bytes
    or path) and decoded in _load_batch, so an unreadable row is skipped and counted like a file.

    A Hub id or parquet files are streamed (no copy into the datasets cache; encoding starts with the
    first shard). The row count, which fixes the shards before reading, comes from the split sizes in the
    dataset's info (a Hub id) or the parquet footers. A stream has no random access, so shards() reads it
    once, in order, from the first shard a rank has to make (IterableDataset.skip: the rows of finished
    shards are read but not decoded) through its last, passing over the other ranks' rows: shard i is rows
    [i * size, (i + 1) * size) for any number of ranks, and a resume reads from its first missing shard.
    The cost is that each of W ranks downloads (up to) the whole split; with many ranks, download the
    Hub dataset once and pass the folder. A save_to_disk folder is read by random access instead.
    Integer labels without a ClassLabel need their class count, max + 1, which only a save_to_disk
    folder gives before the end."""

    def __init__(self, src, split, image_column=None, label_column=None):
        import datasets
        ds, self.count, split = open_hub(src, split)
        try:
            image, label = hub_columns(ds.features or {}, image_column, label_column)
        except UsageError as e:
            raise UsageError(f"--src {src}: {e}")
        self.rows = ds.select_columns([image, label]).cast_column(image, datasets.Image(decode=False))
        self.columns, self.src = (image, label), src
        self.streamed = isinstance(ds, datasets.IterableDataset)
        if self.count == 0:
            raise UsageError(f"--src {src}: no rows")
        if isinstance(ds.features[label], datasets.ClassLabel):
            self.class_names = ds.features[label].names
            self.num_classes = len(self.class_names)
        elif self.streamed:
            raise UsageError(f"--src {src}: the labels ({label}) are integers without class names (no ClassLabel), so "
                             f"their number is unknown before the end; save the dataset with save_to_disk, pass that")
        else:
            self.class_names, self.num_classes = None, int(max(ds[label])) + 1
        self.settings = {"split": split, "columns": [image, label], "num_classes": self.num_classes}
        local = os.path.exists(src) or glob.has_magic(src)
        self.manifest = {"source": os.path.abspath(src) if local else src, "split": split}

    def _items(self, start, rows):
        """(name, encoded bytes or path, label) of rows start, start + 1, ... ({column: list} of rows)."""
        image, label = self.columns
        return [(f"row {start + j}" + (f" ({im['path']})" if im and im["path"] else ""),
                 im and (im["bytes"] or im["path"]), y) for j, (im, y) in enumerate(zip(rows[image], rows[label]))]

    def shards(self, todo, size):
        """(i, items of shard i) for i in todo (ascending): rows [i * size, (i + 1) * size)."""
        if not todo:  # a stream would be read to its end for nothing
            return
        if not self.streamed:
            for i in todo:
                yield i, self._items(i * size, self.rows[i * size:(i + 1) * size])
            return
        wanted, batch, start = set(todo), [], todo[0] * size
        rows = iter(self.rows.skip(start))
        try:
            for k, row in enumerate(rows, start):
                i = k // size
                if i in wanted:
                    batch.append(row)
                if k + 1 == min((i + 1) * size, self.count) and batch:
                    yield i, self._items(i * size, {c: [r[c] for r in batch] for c in self.columns})
                    batch = []
                    if i == todo[-1]:
                        return
        finally:
            rows.close()
        raise UsageError(f"--src {self.src}: the stream ended before the {self.count} rows that its info counts; "
                         f"run again to resume")


def open_source(args):
    """The images --src names: a folder is an ImageFolderItems unless it holds a save_to_disk dataset or
    parquet files (at its top or one level down, as in a Hub repository); that, parquet files or a Hub
    id is HubRows."""
    folder = glob.escape(args.src)
    if os.path.isdir(args.src) and not any(glob.glob(os.path.join(folder, pattern)) for pattern in (
            "state.json", "dataset_dict.json", "*.parquet", os.path.join("*", "*.parquet"))):
        return ImageFolderItems(args.src)
    return HubRows(args.src, args.split, args.image_column, args.label_column)


def _load_batch(items, size):
    """Read and centre-crop (name, file, label) items (file: a path or the encoded image), in a
    DataLoader worker: uint8 images (B, 3, size, size) and labels of the readable ones (None, None if
    there are none), and the names of the others."""
    images, labels, unreadable = [], [], []
    for name, file, label in items:
        try:
            with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as image:
                images.append(center_crop_arr(image.convert("RGB"), size))
            labels.append(label)
        except Exception as e:  # decoders raise many types; any of them means: skip this file
            tqdm.write(f"warning: skipping unreadable image {name}: {one_line(e)}", sys.stderr)
            unreadable.append(name)
    if not images:
        return None, None, unreadable
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels), unreadable


@torch.no_grad()
def encode(vae, images, device, bf16=False):
    """Posterior mean and std (float32, on the CPU) of uint8 images (B, 3, H, W); the encoder runs
    in float32 (as DiT and EDM2 encode), or under bf16 autocast if bf16 is True."""
    x = images.to(device).float() / 127.5 - 1
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        posterior = vae.encode(x).latent_dist
    posterior = type(posterior)(posterior.parameters.float())  # mean and std from fp32 moments
    return posterior.mean.cpu(), posterior.std.cpu()


def encode_shard(items, args, vae, device, bar):
    """Labels and arrays (mean and std, or images) of one shard's (name, file, label) items, and the names
    of the unreadable ones.
    With args.flip each image is followed by its mirror image, an item of its own."""
    loader = torch.utils.data.DataLoader(
        items, args.batch_size, num_workers=args.num_workers,
        collate_fn=functools.partial(_load_batch, size=args.image_size))
    labels, arrays, skipped = [], [], []
    for images, y, unreadable in loader:
        skipped += unreadable
        bar.update(len(unreadable) + (0 if y is None else len(y)))
        if images is None:
            continue
        if args.flip:
            images = torch.stack([images, images.flip(-1)], 1).flatten(0, 1)
            y = y.repeat_interleave(2)
        arrays.append((images,) if vae is None else encode(vae, images, device, args.bf16))
        labels.append(y)
    if not labels:
        raise UsageError(f"all {len(items)} images of a shard are unreadable, e.g. {skipped[0]}")
    return torch.cat(labels).numpy(), [torch.cat(a).numpy() for a in zip(*arrays)], skipped


def _skip_file(out, index):
    """The json of a shard's skipped images, written before its labels file: it survives resumes."""
    return os.path.join(out, f"shard-{index:05d}.skipped.json")


def cmd_imagenet(args):
    """Encode the images of --src (open_source: an ImageFolder or a Hugging Face dataset) into shards of VAE
    posteriors (or uint8 pixels with --vae none): shard i is items [i * shard_size, (i + 1) * shard_size)."""
    source = open_source(args)
    rank, world, device = setup_distributed(LONG_WAIT)
    vae, size = None, args.image_size
    kind, shape = "pixel", (3, size, size)
    if args.vae != "none":
        vae = load_vae(_vae_source(args)).to(device)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if size % factor:
            raise UsageError(f"--image-size {size}: not a multiple of the VAE's downsampling {factor}")
        kind, shape = "latent", (vae.config.latent_channels, size // factor, size // factor)
    writer = ShardWriter(args.out, kind, shape, source.num_classes, args.shard_size)
    ChunkFolder(args.out, {"image_size": size, "vae": args.vae, "flip": args.flip, "bf16": args.bf16,  # records the
                           "shard_size": args.shard_size, "num_images": source.count, **source.settings})  # settings
    num_shards = -(-source.count // args.shard_size)
    todo = [i for i in my_chunks(num_shards) if not writer.shard_done(i)]
    pending = sum(min(args.shard_size, source.count - i * args.shard_size) for i in todo)
    start = time.time()
    with progress(total=pending, unit="img", enabled=rank == 0 and not args.no_progress) as bar:
        for i, items in source.shards(todo, args.shard_size):
            labels, data, skipped = encode_shard(items, args, vae, device, bar)
            skip_record = json.dumps({"skipped": len(skipped), "files": skipped}).encode()
            atomic_write(_skip_file(args.out, i), lambda f: f.write(skip_record))
            writer.write_shard(i, labels, **dict(zip(ARRAYS[kind], data)))
    seconds = time.time() - start
    print(f"{f'rank {rank}: ' if world > 1 else ''}encoded {pending} images in {seconds:.0f} s "
          f"({pending / max(seconds, 1e-9):.1f} images/s)")
    barrier()
    if rank == 0:
        skipped = sum(read_json(_skip_file(args.out, i))["skipped"] for i in range(num_shards))
        manifest = writer.finish(
            vae=VAES.get(args.vae), image_size=size, class_names=source.class_names, skipped=skipped,
            flip=args.flip, **source.manifest,
            vae_dtype=None if vae is None else "bfloat16" if args.bf16 else "float32",
            **({"vae_path": os.path.abspath(args.vae_path)} if kind == "latent" and args.vae_path
               else {}))
        print(f"{args.out}: {manifest['num_items']} {kind} items {manifest['shape']} in "
              f"{source.num_classes} classes; {skipped} unreadable images skipped")
    if world > 1:
        dist.destroy_process_group()


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
