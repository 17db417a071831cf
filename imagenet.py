"""ImageNet, or any image dataset, into the shard format of data.py: the `download.py imagenet` command.

The source (--src) is an ImageFolder (ImageFolderItems), or a dataset read with the `datasets` library
(HubRows): a save_to_disk folder, a folder (the Hub's layout), file or glob of parquet files, or a Hub id
(streamed). Item k is the k-th image (of the sorted ImageFolder, or row k of the split) and shard i holds
items [i * shard_size, (i + 1) * shard_size) whatever the source and the number of ranks. Each image is
centre-cropped as ADM does and encoded to the SD VAE's posterior mean and std (or kept as pixels). The
same command again keeps finished shards (data.ChunkFolder refuses other options).
"""
import functools
import glob
import hashlib
import io
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from cli import LONG_WAIT, UsageError, barrier, my_chunks, one_line, setup_distributed
from data import ARRAYS, ChunkFolder, ShardWriter, read_json, write_json
from download import VAES, load_vae, vae_source
from eval_inputs import IMAGE_EXTENSIONS, image_files
from progress import progress


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
        vae = load_vae(vae_source(args)).to(device)
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
            write_json(_skip_file(args.out, i), {"skipped": len(skipped), "files": skipped})
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
