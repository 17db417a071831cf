"""FID, sFID, IS, precision and recall as the ADM evaluator computes them, and FD-DINOv2 as EDM2 does,
without TensorFlow (evaluation.py holds the definitions; this is its command line).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --json out.json
    python fid.py samples.npz REF --metrics fid,sfid,is,pr,fd_dinov2 --inception-weights FILE --dinov2-weights FILE
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --dinov2-reference TRAIN_IMAGES   # EDM2's FD-DINOv2
    python fid.py samples.npz results/demo-data --reference-subsample 2000     # 2,000 random reference images
    python fid.py samples.npz results/demo-data --metrics fd_classifier --cache-dir results/eval-cache
    torchrun --nproc_per_node=8 fid.py samples.npz REF          # feature extraction shared by the ranks

SAMPLES: an .npz with arr_0 uint8 N x H x W x 3 (the ADM format; or precomputed mu and sigma).
REFERENCE: an ADM reference batch .npz (its precomputed statistics are used, as the ADM evaluator does), a
folder of images or a data.py pixel dataset. FD-DINOv2 as EDM2 reports it is against the training set's
statistics (--dinov2-reference TRAIN_IMAGES); against an ADM batch it is another number, and the output says so.
fd_classifier is train.py's in-run metric for pixel data (feature_nets' small classifier, trained on REFERENCE
and cached in --cache-dir, else beside REFERENCE; RESULTS/eval-cache reuses the run's). The default metrics
are those whose weights are found, else fd_classifier for a pixel dataset. Weights are never downloaded:
Inception from --inception-weights, $MAPDIT_INCEPTION_WEIGHTS or the torch hub cache
(checkpoints/pt_inception-2015-12-05-6726825d.pth); DINOv2 likewise (dinov2_vitl14_pretrain.pth). Reference
statistics are cached; sample features go to SAMPLES-features/ while computed, so a rerun resumes.
"""
import os
import sys

import torch.distributed as dist

import feature_nets
from cli import LONG_WAIT, ArgumentParser, UsageError, at_least, run_command, setup_distributed
from data import LatentDataset, write_json
from evaluation import METRICS, available_metrics, evaluate, parse_metrics, pick_device

NAMES = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall",
         "fd_dinov2": "FD-DINOv2", "fd_classifier": "FD-classifier",
         "reference_self_fid": "FID of the reference's images to its own mu/sigma",
         "reference_self_sfid": "sFID of the reference's images to its own mu_s/sigma_s"}


def build_parser():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("samples", help=".npz with arr_0 images (or mu and sigma)")
    parser.add_argument("reference", help="ADM reference batch .npz, image folder or data.py pixel dataset")
    parser.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)},fd_classifier (pr = precision and "
                        "recall; default: every metric whose weights are found)")
    parser.add_argument("--inception-weights", metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth "
                        "(default: $MAPDIT_INCEPTION_WEIGHTS, then the torch hub cache)")
    parser.add_argument("--dinov2-weights", metavar="FILE", help="dinov2_vitl14_pretrain.pth "
                        "(default: $MAPDIT_DINOV2_WEIGHTS, then the torch hub cache)")
    parser.add_argument("--dinov2-reference", metavar="TRAIN_IMAGES", help="the reference of FD-DINOv2 alone: the "
                        "training images (folder or pixel dataset), as EDM2 compares (default: REFERENCE)")
    parser.add_argument("--reference-subsample", type=at_least(1), metavar="N", help="score against N of the "
                        "reference's images drawn at random (not its precomputed statistics): faster with a large "
                        "reference, at the cost of a noisier number (default: all of them)")
    parser.add_argument("--subsample-seed", type=int, default=0, metavar="S",
                        help="numpy seed of --reference-subsample's draw (default 0)")
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    parser.add_argument("--batch-size", type=at_least(1), default=100, help="images per network batch (default 100)")
    parser.add_argument("--cache-dir", metavar="DIR", help="keep reference statistics (and fd_classifier's classifier) "
                        "here, not beside the reference")
    parser.add_argument("--no-cache", action="store_true", help="compute reference statistics afresh, keep nothing")
    parser.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (with the output redirected, it "
                        "is a plain line every 30 s)")
    return parser


def _caveat(key, args, results):
    """What to know beside a number: FD-DINOv2 against an .npz batch is not EDM2's (training-set statistics),
    FD-classifier is not FID."""
    if key == "fd_classifier":
        return f" (features of the small classifier of {args.reference}, train.py's fd_classifier; not comparable to FID)"
    if key != "fd_dinov2" or args.dinov2_reference or not args.reference.endswith(".npz"):
        return ""
    return (f" (against the {results['num_reference']} images of {args.reference}, not the training set's statistics "
            f"EDM2's numbers use: not comparable to them; --dinov2-reference TRAIN_IMAGES gives those)")


def classifier(args, dataset):
    """feature_nets' classifier of the pixel dataset args.reference, as train.py has it for fd_classifier:
    trained with the one recipe, or read from the cache (--cache-dir, else the reference's folder)."""
    if dataset is None or dataset.kind != "pixel":
        raise UsageError(f"fd_classifier: {args.reference} is not a data.py pixel dataset; give the run's pixel data "
                         f"as the reference (its classifier trains on it)")
    cache_dir = args.cache_dir or os.path.dirname(os.path.realpath(args.reference))
    return feature_nets.trained_classifier(dataset, cache_dir, pick_device(args.device),
                                           log=lambda line: print(line, file=sys.stderr))


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world, _ = setup_distributed(LONG_WAIT)
    try:
        is_dataset = os.path.isfile(os.path.join(args.reference, "manifest.json"))
        dataset = LatentDataset(args.reference) if is_dataset else None
        metrics = parse_metrics(args.metrics, ("classifier",)) if args.metrics else None
        if metrics is None and is_dataset and dataset.kind == "pixel" \
                and not available_metrics(args.inception_weights, args.dinov2_weights):
            metrics = ["fd_classifier"]  # train.py's fallback
        networks = {"classifier": classifier(args, dataset)} if metrics and "fd_classifier" in metrics else {}
        results = evaluate(args.samples, args.reference, metrics, batch_size=args.batch_size, device=args.device,
                           inception_weights=args.inception_weights, dinov2_weights=args.dinov2_weights,
                           cache=False if args.no_cache else (args.cache_dir or True), progress=not args.no_progress,
                           dinov2_reference=args.dinov2_reference, networks=networks,
                           reference_subsample=args.reference_subsample and (args.reference_subsample,
                                                                             args.subsample_seed))
        if rank != 0:
            return
        for key, name in NAMES.items():
            if key in results:
                print(f"{name}: {results[key]:.4f}{_caveat(key, args, results)}")
        if args.reference_subsample:
            print(f"(against {args.reference_subsample} reference images drawn with --subsample-seed "
                  f"{args.subsample_seed})")
        if args.json:
            write_json(args.json, results)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None):
    """fid.py as a command: 0; bad input one line and 2."""
    return run_command("fid.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
