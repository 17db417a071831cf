"""Evaluation as papers report it, in PyTorch: FID, sFID, IS, precision and recall with the ADM
evaluator's definitions (guided-diffusion evaluations/evaluator.py) and FD-DINOv2 as EDM2 has it
(docs/evaluation.md; the metrics' table is the README's).

    evaluate("samples.npz", "VIRTUAL_imagenet256_labeled.npz")
    # {"fid": ..., "sfid": ..., "is": ..., "precision": ..., "recall": ..., "fd_dinov2": ...,
    #  "num_samples": 50000, "num_reference": 10000}

Samples and references: eval_inputs.Side. Reference statistics are cached per (reference, network);
features are extracted in resumable chunk files shared over torch.distributed ranks; processes sharing
a cache or a chunk folder take turns (runs.folder_lock); TF32 off, as EDM2 evaluates; Frechet
distances in float64.
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist

import feature_nets
import runs
from cli import UsageError, barrier, gather_chunks, my_chunks, one_line, rank_world
from data import ChunkFolder, atomic_write
from eval_inputs import Side, array_key, check_images, check_stats
from progress import progress as progress_bar
from sampling import chunk_sizes

METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
SOURCES = {"fid": ("inception", "pool"), "sfid": ("inception", "spatial"), "is": ("inception", "logits"),
           "pr": ("inception", "pool"), "fd_dinov2": ("dinov2", "cls")}
IS_SPLIT, PR_K, PR_ROWS = 5000, 3, 10000
CACHE_VERSION = 1


#################################################################################
#                                The metrics                                    #
#################################################################################

def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix (round-off negatives clamped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) between two
    Gaussians, in float64. tr((S1 S2)^1/2), the sum of the square roots of the eigenvalues of
    S1^1/2 S2 S1^1/2, is the sum of the singular values of S2^1/2 S1^1/2 (the square roots from
    symmetric eigendecompositions): unlike square roots of eigenvalues, singular values do not
    magnify round-off, which keeps the distance of singular covariances (N < D) at ~0, not ~1e-4.
    (The ADM evaluator's scipy sqrtm, with 1e-6 on the diagonal when it fails, agrees where it
    succeeds; this never fails.)"""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need means (D,) and covariances (D, D) of one D, got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    tr_root = np.linalg.svd(_sqrt_psd(s2) @ _sqrt_psd(s1), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_root)


def feature_stats(features):
    """(mu, sigma) in float64 numpy of features (N, D), numpy or torch (computed on the tensor's
    device): the mean and the unbiased covariance (np.cov, as the ADM evaluator and EDM2 use)."""
    f = torch.as_tensor(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {tuple(f.shape)}")
    f = f.double()
    mu = f.mean(0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def inception_score(probs, split_size=IS_SPLIT):
    """exp(mean_x KL(p(y|x) || p(y))) on consecutive splits of split_size rows of probs (N, C)
    (the last split may be shorter, as in the ADM evaluator), averaged over splits; 0 log 0 = 0."""
    p = np.asarray(probs, np.float64)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        safe = np.where(part > 0, part, 1.0)
        kl = (part * (np.log(safe) - np.log(np.where(part > 0, marginal, 1.0)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def softmax64(logits):
    """Softmax over all columns, in float64 numpy."""
    return torch.softmax(torch.as_tensor(logits).double(), dim=1).cpu().numpy()


def _sq_distances(a, b):
    """Squared Euclidean distances (len(a), len(b)), clamped at 0, as the ADM evaluator's."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def manifold_radii(features, k=PR_K, rows=PR_ROWS):
    """Squared distance of each feature (N, D) torch tensor to its k-th nearest neighbour, the
    feature itself counting as the 0-th (the ADM evaluator's k-NN radii)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall need more than k = {k} features on each side, got {len(features)}")
    return torch.cat([_sq_distances(features[i:i + rows], features).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(features), rows)])


def _covered(points, centres, radii, rows=PR_ROWS):
    """Fraction of points within radii[j] (squared) of some centres[j]."""
    inside = [(_sq_distances(points[i:i + rows], centres) <= radii[None]).any(1)
              for i in range(0, len(points), rows)]
    return float(torch.cat(inside).double().mean())


def precision_recall(reference, samples, k=PR_K, device=None):
    """(precision, recall) after Kynkaanniemi et al. 2019 as the ADM evaluator computes them:
    precision is the fraction of samples inside the k-NN manifold of the reference features,
    recall the fraction of reference features inside the samples' manifold (float32 distances)."""
    ref, sam = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (reference, samples))
    return (_covered(sam, ref, manifold_radii(ref, k)), _covered(ref, sam, manifold_radii(sam, k)))


def write_npz_samples(path, images):
    """Write uint8 images (N, H, W, 3) as arr_0 of an .npz (the ADM format), atomically (data.atomic_write:
    a failed write leaves no file); return the path written (.npz appended when missing)."""
    images = np.asarray(images)
    check_images(images, "write_npz_samples")
    path = str(path) if str(path).endswith(".npz") else f"{path}.npz"
    atomic_write(path, lambda f: np.savez(f, arr_0=images))
    return path


#################################################################################
#                                Feature extraction                             #
#################################################################################

def extract_features(network, images, *, batch_size=100, chunk_size=None, work_dir=None, progress=True,
                     desc=None, key=None):
    """{output: float32 numpy (N, dim)} of network over images (len() and [i:j] batches).

    Chunk k holds images [k * chunk_size, (k + 1) * chunk_size); rank r of torch.distributed does the
    chunks with k % world == r. With work_dir (a folder all ranks share: a data.ChunkFolder, started
    afresh for another network, images (key) or sizes) each chunk is written there as it finishes and
    a rerun skips finished chunks; without it the ranks exchange their features with
    all_gather_object. A work_dir needs a key."""
    if work_dir and key is None:
        raise ValueError("extract_features: a work_dir needs a key saying which images its chunks hold")
    n, chunk_size = len(images), chunk_size or 10 * batch_size
    sizes = chunk_sizes(n, chunk_size)
    folder = work_dir and ChunkFolder(work_dir, dict(network=network.key, images=key, n=n, chunk_size=chunk_size),
                                      replace=True)
    local = {}
    for k, bar in chunks_to_do(sizes, folder, progress, desc=desc or f"features {network.name}"):
        parts = []
        for i in range(k * chunk_size, k * chunk_size + sizes[k], batch_size):
            batch = images[i:min(i + batch_size, k * chunk_size + sizes[k])]
            parts.append({o: v.float().cpu().numpy() for o, v in network(batch).items()})
            bar.update(len(batch))
        local[k] = {o: np.concatenate([p[o] for p in parts]) for o in parts[0]}
        if folder:
            folder.save(k, **local[k])
    if folder:
        barrier()
        local = {k: folder.load(k) for k in range(len(sizes))}
    else:
        local = gather_chunks(local)
    return {o: np.concatenate([local[k][o] for k in range(len(sizes))]) for o in network.outputs}


def chunks_to_do(sizes, folder=None, progress=True, **bar):
    """Yield (k, progress bar) for each chunk k of this rank (k % world == rank) that folder (a
    data.ChunkFolder, or None) does not hold yet; the bar (rank 0 only; bar: tqdm's desc, ...) counts
    this rank's images of `sizes`, the chunks done counted from the start."""
    rank, mine = rank_world()[0], my_chunks(len(sizes))
    todo = [k for k in mine if not (folder and folder.done(k))]
    with progress_bar(total=sum(sizes[k] for k in mine), initial=sum(sizes[k] for k in mine if k not in todo),
                      unit="img", enabled=progress and rank == 0, **bar) as b:
        for k in todo:
            yield k, b


#################################################################################
#                        Reference statistics and their cache                   #
#################################################################################

@contextlib.contextmanager
def _tf32_off():
    """TF32 off for matmuls and cuDNN while the block runs, as EDM2 evaluates (train.py and sample.py
    turn it on for their process); the caller's flags come back afterwards, also after an error."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cache_path(side, network, cache):
    """Where side's statistics under network are cached: beside the reference (cache=True), in the
    folder `cache`, or nowhere (cache falsy, or a reference that is not on disk)."""
    if not cache or side.key is None:
        return None
    real = os.path.realpath(side.path).rstrip(os.sep)
    if cache is True:
        return f"{real}{side.tag}.{network.name}-stats.npz"
    name = os.path.basename(real) + "-" + hashlib.sha256(real.encode()).hexdigest()[:8]
    return os.path.join(os.fspath(cache), f"{name}{side.tag}.{network.name}-stats.npz")


def _side_features(side, network, *, keep, cache, work_dir, batch_size, progress):
    """{output: (mu, sigma)} and {output in keep: features} of side's images under network,
    read from / written to the cache when the side is a file or folder. Processes sharing the cache
    or the chunk folder take turns: unless the cache is there, the folder holding the chunks is
    locked from a second look at the cache to the removal of the chunks."""
    path = cache_path(side, network, cache)
    keep = sorted(set(keep) | set(getattr(network, "cache_features", ()) if path else ()))
    key = json.dumps(dict(version=CACHE_VERSION, images=side.key, network=network.key))
    cached = path and _read_cache(path, key, network.outputs, keep)
    if path and _everywhere(cached):
        return cached
    chunk_dir = f"{path}.chunks" if path else work_dir
    with _turn(chunk_dir and os.path.dirname(chunk_dir)):
        cached = path and _read_cache(path, key, network.outputs, keep)  # written while this process waited?
        if cached:
            return cached
        images_key = side.key or (chunk_dir and array_key(side.images))  # in-memory images: by content
        try:
            features = extract_features(network, side.images, batch_size=batch_size, work_dir=chunk_dir,
                                        key=images_key, progress=progress,
                                        desc=f"{network.name} features of {side.label}")
            device = getattr(network, "device", None)
            stats = {o: feature_stats(torch.as_tensor(f, device=device)) for o, f in features.items()}
            for o, (mu, sigma) in stats.items():
                check_stats(mu, sigma, f"{side.label}: its {network.name} {o} features",
                            fix=f"are the weights ({network.key}) sound?")
        except UsageError:  # a refusal (an unreadable image, one of another size) leaves nothing behind;
            _remove_chunks(chunk_dir)  # an interruption keeps the finished chunks for the rerun
            raise
        kept = {o: features[o] for o in keep}
        if path and rank_world()[0] == 0:
            _write_cache(path, key, stats, kept)
        barrier()
        _remove_chunks(chunk_dir)
    return stats, kept


def _remove_chunks(chunk_dir):
    """Rank 0 removes chunk_dir, and the folder holding it once empty (SAMPLES-features/ once its
    last network is done)."""
    if chunk_dir and rank_world()[0] == 0:
        shutil.rmtree(chunk_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(chunk_dir))


def _read_cache(path, key, outputs, keep):
    """(statistics, features) cached at path under key, or None (missing, unreadable, another key)."""
    try:
        with np.load(path) as z:
            if str(z["key"]) == key and all(f"{o}_features" in z.files for o in keep):
                return {o: (z[f"{o}_mu"], z[f"{o}_sigma"]) for o in outputs}, {o: z[f"{o}_features"] for o in keep}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing, unreadable or of another version: computed again
    return None


def _write_cache(path, key, stats, features):
    arrays = {f"{o}_{s}": v for o, (mu, sigma) in stats.items() for s, v in (("mu", mu), ("sigma", sigma))}
    arrays.update({f"{o}_features": f for o, f in features.items()})
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays, key=np.array(key)))
    except UsageError as e:
        print(f"evaluation: cannot cache statistics at {path} ({e}); they are computed again next time",
              file=sys.stderr)


def _everywhere(flag):
    """Whether flag holds on every rank of torch.distributed (so that all ranks take one path)."""
    flags = [None] * rank_world()[1]
    if len(flags) > 1:
        dist.all_gather_object(flags, bool(flag))
    return all(flags) if len(flags) > 1 else bool(flag)


@contextlib.contextmanager
def _turn(folder):
    """The block run by one process at a time among those sharing folder (created if missing; None:
    no turns): rank 0 of torch.distributed holds runs.folder_lock on it, the other ranks enter with it.
    A lock got on a folder that the process before removed while this one waited excludes no one: the
    folder is made and locked again."""
    with contextlib.ExitStack() as lock:
        while folder and rank_world()[0] == 0:
            try:
                os.makedirs(folder, exist_ok=True)
                before = os.stat(folder)
                lock.enter_context(runs.folder_lock(folder))
                if os.path.samestat(before, os.stat(folder)):
                    break
            except FileNotFoundError:
                pass
            except (OSError, UsageError) as e:
                raise UsageError(f"{folder}: cannot create or lock it ({getattr(e, 'strerror', None) or e})") from None
            lock.close()
        if folder:
            barrier()
        yield


#################################################################################
#                                   evaluate                                    #
#################################################################################

def pick_device(device):
    """device, checked (UsageError for a name torch does not know or a device this machine lacks); by
    default cuda:LOCAL_RANK where there is a GPU, else cpu."""
    if device is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError, NotImplementedError) as e:  # unknown, not built in, no driver
        raise UsageError(f"device {device}: not usable here ({one_line(e)}); use cpu, or cuda[:N] where "
                        f"there is a GPU") from None
    return torch.device(device)


def load_network(name, device, inception_weights=None, dinov2_weights=None):
    """The built-in feature network `name` ("inception" or "dinov2"); UsageError for missing weights."""
    if name == "inception":
        return feature_nets.InceptionNet(inception_weights, device)
    return feature_nets.DINOv2Net(dinov2_weights, device)


def available_metrics(inception_weights=None, dinov2_weights=None):
    """The metrics whose weights can be found (the default list)."""
    found = []
    for names, weights, net in ((METRICS[:4], inception_weights, "inception"), (("fd_dinov2",), dinov2_weights, "dinov2")):
        with contextlib.suppress(UsageError):
            feature_nets.find_weights(weights, *feature_nets.WEIGHTS[net])
            found += names
    return found


def parse_metrics(metrics, networks=()):
    """A list of metric names from a list or a comma-separated string; raises UsageError."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    known = (*METRICS, *(f"fd_{n}" for n in networks))
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise UsageError((f"unknown metric {bad[0]!r}" if bad else "empty metric list")
                        + f" (choose from {', '.join(known)})")
    return list(dict.fromkeys(names))


@_tf32_off()
def evaluate(samples, reference, metrics=None, *, batch_size=100, device=None, inception_weights=None,
             dinov2_weights=None, networks=None, cache=True, work_dir=None, progress=True, dinov2_reference=None,
             reference_subsample=None):
    """The metrics of samples against reference (see the module docstring for both) as a dict with
    the keys fid, sfid, is, precision, recall, fd_dinov2, fd_<name> (those computed), num_samples and
    num_reference (None for statistics alone), and num_dinov2_reference with a dinov2_reference.

    metrics: names or "fid,sfid,..."; default: every metric whose weights are found (and that the
    inputs allow). networks: {name: feature network} adds the metric fd_<name> on its first output.
    dinov2_reference: the reference of fd_dinov2 alone (a reference as above; EDM2 compares with the
    whole training set's statistics, while an ADM batch holds 10,000 images), cached like the other.
    reference_subsample (n, seed): score against n of the reference's images drawn at random (not its
    precomputed statistics; eval_inputs.random_subset), cached apart from the whole reference's.
    cache: True (a file beside the reference), a folder, or False. work_dir: where an in-memory
    samples array keeps its resumable feature chunks, keyed by a sha256 of its bytes (an .npz's go
    beside it). Under torchrun every rank calls evaluate and gets the results. Raises UsageError."""
    networks = dict(networks or {})
    default = metrics is None
    metrics = parse_metrics(metrics if not default else
                            available_metrics(inception_weights, dinov2_weights) + [f"fd_{n}" for n in networks]
                            + (["fd_dinov2"] if dinov2_reference is not None else []) or ["fid"], networks)
    if dinov2_reference is not None and "fd_dinov2" not in metrics:
        raise UsageError("a DINOv2 reference is given, but fd_dinov2 is not among the metrics: add it")
    samples, reference = Side(samples, "samples"), Side(reference, "reference", reference_subsample)
    dinov2_side = None if dinov2_reference is None else Side(dinov2_reference, "DINOv2 reference")
    pairs = {m: (samples, reference if m != "fd_dinov2" or dinov2_side is None else dinov2_side) for m in metrics}
    metrics = _feasible(metrics, pairs, default)
    for name, side in (("the reference", reference), ("the DINOv2 reference", dinov2_side)):
        shapes = samples.image_shape, None if side is None else side.image_shape
        if None not in shapes and shapes[0] != shapes[1]:
            raise UsageError(f"samples are {shapes[0][1]}x{shapes[0][0]}, {name} {shapes[1][1]}x{shapes[1][0]}: "
                            f"compare images of one resolution (sample at the reference's size or pick its batch)")
    device = pick_device(device)
    sources = dict(SOURCES, **{f"fd_{n}": (n, next(iter(net.outputs))) for n, net in networks.items()})
    results = {}
    for name in dict.fromkeys(sources[m][0] for m in metrics):
        wanted = [m for m in metrics if sources[m][0] == name]
        sides = pairs[wanted[0]]  # one reference per network
        needs = [_needs(side, wanted, side is samples) for side in sides]
        net = None
        if any(needs):
            net = networks.get(name) or load_network(name, device, inception_weights, dinov2_weights)
        for m in wanted:
            if m not in ("is", "pr"):
                _check_dimensions(m, sides, net, sources[m][1])
        stats, feats = [{}, {}], [{}, {}]
        for i, side in enumerate(sides):
            if needs[i]:
                if name not in networks and isinstance(side.images, np.ndarray):  # folders, datasets: by construction
                    check_images(side.images, side.label)
                keep = [o for m, o in (("pr", "pool"), ("is", "logits")) if m in needs[i]]
                chunks = _chunk_dir(side, name, work_dir) if i == 0 else None
                stats[i], feats[i] = _side_features(side, net, keep=keep, cache=cache if i == 1 else False,
                                                    work_dir=chunks, batch_size=batch_size, progress=progress)
        for m in wanted:
            if m == "is":
                results["is"] = inception_score(softmax64(feats[0]["logits"]))
            elif m == "pr":
                results["precision"], results["recall"] = precision_recall(feats[1]["pool"], feats[0]["pool"],
                                                                         device=device)
            else:
                a, b = (side.stats.get(m) or st[sources[m][1]] for side, st in zip(sides, stats))
                results[m] = frechet_distance(*a, *b)
        for metric, output in (("fid", "pool"), ("sfid", "spatial")):  # the ADM tensor check, when both exist
            if name == "inception" and metric in sides[1].stats and output in stats[1]:
                results[f"reference_self_{metric}"] = frechet_distance(*sides[1].stats[metric], *stats[1][output])
    results.update(num_samples=len(samples) or None, num_reference=len(reference) or None)
    if dinov2_side is not None:
        results["num_dinov2_reference"] = len(dinov2_side) or None
    return results


def _needs(side, wanted, is_samples):
    """The metrics for which side's images must go through the network: IS (samples), precision and
    recall, and Frechet distances without precomputed statistics."""
    if side.images is None:
        return []
    return [m for m in wanted if m == "pr" or (m == "is" and is_samples) or (m not in ("is", "pr") and m not in side.stats)]


def _chunk_dir(side, network_name, work_dir):
    """Where the samples' feature chunks go: beside an .npz or folder, else under work_dir (or nowhere)."""
    if side.path:
        return f"{side.path[:-4] if side.path.endswith('.npz') else side.path.rstrip(os.sep)}-features/{network_name}"
    return work_dir and os.path.join(work_dir, network_name)


def _feasible(metrics, pairs, default):
    """The metrics the inputs allow (pairs: {metric: (samples, its reference)}): IS needs sample
    images, precision/recall more than k images on both sides, a Frechet distance images or
    statistics on each side. Dropped from a default list, else an error."""
    kept = []
    for m in metrics:
        sides = pairs[m]
        users = [sides[0]] if m == "is" else sides if m == "pr" else [s for s in sides if m not in s.stats]
        reasons = [f"{s.label} holds no images" + ("" if m in ("is", "pr") else f" and no {m} statistics")
                   if s.images is None else
                   f"{s.label} holds {len(s)} images; precision/recall need more than k = {PR_K} on each side"
                   for s in users if s.images is None or (m == "pr" and len(s) <= PR_K)]
        if reasons and not default:
            raise UsageError(f"{m}: {reasons[0]}")
        kept += [] if reasons else [m]
    if not kept:
        raise UsageError("none of the metrics can be computed from these inputs")
    return kept


def _check_dimensions(metric, sides, net, output):
    """UsageError unless the two sides of the Frechet distance `metric` have one dimension: that of the
    statistics a side gives, else of the network's features (net.outputs[output], where it says)."""
    dims = [(len(s.stats[metric][0]), f"the {metric} statistics of {s.label}") if metric in s.stats
            else (net.outputs[output], f"the {net.name} {output} features of {s.label}") for s in sides]
    (d1, what1), (d2, what2) = dims
    if d1 and d2 and d1 != d2:
        raise UsageError(f"{metric}: {what1} are {d1}-d, {what2} {d2}-d: statistics of another feature network? "
                        f"(give images, or statistics of one network)")
