"""Sample from a train.py run (or an official DiT checkpoint): a PNG grid, or an .npz for FID.

    python sample.py --result-dir results/000-MaP-DiT-S-2 --class-label 88 207 360
    python sample.py --result-dir RUN --class-label 1 2 --weights ema-0.07 --sampler dpm++
    python sample.py --result-dir RUN --fid 50000                          # cfg 1.5 by default; resumable
    torchrun --nproc_per_node=8 sample.py --result-dir RUN --fid 50000     # chunks shared by ranks
    python sample.py --result-dir RUN --fid 50000 --cfg-scale 1.8 --guidance-interval 0 2.33
    python sample.py --result-dir RUN --class-label 1 2 --cfg-scale 2 --guide RUN/checkpoints/0000500.pt
    python sample.py --ckpt pretrained_models/DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \\
        --class-label 207 360 --cfg-scale 4
    python sample.py --ckpt exports/my-model --class-label 1 2            # an export.py folder
    python sample.py --ckpt owner/name --class-label 1 2                   # such a folder on the Hub

An export (export.py: model.safetensors and config.json, in a folder or a Hugging Face Hub repository
fetched into huggingface_hub's cache) holds one set of weights and everything needed to sample it.
A grid has one row per --class-label; --fid N writes an ADM-evaluator .npz through resumable chunk
files whose labels and noise depend only on (--seed, chunk), so a rerun gives the same array.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist

from cli import ArgumentParser, UsageError, at_least, barrier, rank_world, run_command, setup_distributed
from data import ChunkFolder
from download import VAES, open_decoder, read_official
from ema import posthoc_coefficients, valid_sigma_rel
from evaluation import chunks_to_do, write_npz_samples
from guidance import EVERY_STEP, Guided
from models import MODEL_SIZES, MP_SWITCHES, DiT_models
from runs import SEED_RANGE, SNAPSHOT_KEYS, T_MAX, build_model, checkpoints_in, load_checkpoint, saved_args
from sampling import (DEFAULT_SAMPLER, DEFAULT_STEPS, FLOW_PREDICTION, SAMPLERS, chunk_inputs, chunk_sizes,
                      make_sampler, objective_of, row_names, sample_chunk, sample_images, sampling_weights_name,
                      save_grid)

DIT_LATENT_SCALE = 0.18215  # the official DiT models see SD-VAE latents times this
CFG_SCALE = {"grid": 4.0, "fid": 1.5}  # --cfg-scale by default: DiT's grids and its FID setting
NOT_SAMPLE_SETTINGS = ("out", "compile", "no_progress", "num_samples", "class_label",  # --fid resumes across them
                       "cfg_scale_given")
EMA_INIT_WARNING = 0.1  # warn when the classic EMA still gives its initial weights this share or more
POWER_EMA = re.compile(r"ema-(\d+\.?\d*|\.\d+)")  # --weights ema-<sigma_rel>: group 1 is sigma_rel
EXPORT_FORMAT = 1  # the config.json format export.py writes; a newer one is refused
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"  # an export folder's files
ARCHITECTURE_KEYS = ("model", "depth", "hidden_size", "num_heads", "mp", "modulation", *MP_SWITCHES)  # build_model's
OBJECTIVE_KEYS = ("objective", "time_dist", "logit_mean", "logit_std")  # an export keeps those its run has
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name of a Hugging Face Hub repository


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    g = p.add_argument_group("what to sample from")
    g.add_argument("--result-dir", metavar="RUN", help="a train.py run directory: its latest checkpoint")
    g.add_argument("--ckpt", metavar="FILE", help="a train.py checkpoint, an official DiT state dict, or an export.py "
                   "folder or Hub id (owner/name)")
    g.add_argument("--weights", metavar="W", help="raw, ema (classic), or ema-<sigma_rel>: a tracked power "
                   "EMA, any other sigma_rel reconstructed post hoc from the snapshots (default: the "
                   "widest tracked power EMA, else ema)")
    g.add_argument("--model", default="DiT-XL/2", help="official state dicts only: the model (default DiT-XL/2)")
    g.add_argument("--image-size", type=int, default=256, metavar="PX", help="official state dicts only (default 256)")
    g.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm", help="official state dicts only: ddpm "
                   "for DiT's weights, flow for SiT's (download.py sit; t in [0, 1], velocity) (default ddpm)")
    g.add_argument("--vae", choices=sorted(VAES), default="ema",
                   help="official state dicts only: stabilityai/sd-vae-ft-ema or -mse (default ema)")
    g.add_argument("--vae-path", metavar="DIR", help="load the VAE from this save_pretrained directory")
    g = p.add_argument_group("sampling")
    g.add_argument("--class-label", type=int, nargs="+", metavar="Y", help="grid rows: one class label each")
    g.add_argument("--num-samples", type=at_least(1), default=8, metavar="N", help="grid columns: samples per label (default 8)")
    g.add_argument("--sampler", choices=list(DEFAULT_STEPS),
                   help="DDPM models: ancestral ddpm, ddim (eta 0) or dpm++ (DPM-Solver++(2M), diffusers); flow models: "
                        "euler, heun (ODE), sde (SiT's Euler-Maruyama) or dopri5 (adaptive ODE, torchdiffeq) "
                        f"(default {' / '.join(DEFAULT_SAMPLER.values())})")
    g.add_argument("--num-sampling-steps", type=at_least(1), metavar="N",
                   help=f"default {', '.join(f'{s} for {k}' for k, s in DEFAULT_STEPS.items() if s)}")
    g.add_argument("--time-shift", type=float, default=1.0, metavar="S", help="flow samplers: SD3's shift of the "
                   "step grid, noise levels times S (> 1: finer steps at the noise end; default 1)")
    g.add_argument("--cfg-scale", type=float, metavar="S",
                   help="guidance scale w: classifier-free, or autoguidance with --guide; 1 = none (default "
                        f"{CFG_SCALE['grid']:g} for a grid, {CFG_SCALE['fid']:g} for --fid: DiT's FID setting)")
    g.add_argument("--cfg-channels", type=at_least(1), metavar="K",
                   help="guide only the first K latent channels; 3 = the original DiT code (default: all)")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=list(EVERY_STEP), metavar=("LO", "HI"),
                   help="guide only where the noise level sigma lies in (LO, HI]: sqrt((1 - abar_t) / abar_t) for "
                        "DDPM, (1 - t) / t for a flow's t (default 0 inf: every step; EDM2's 0.28 5.42; REPA's t <= "
                        "0.7 is 0 2.33)")
    g.add_argument("--guide", metavar="RUN_OR_CKPT",
                   help="autoguidance: D = D_guide + w (D_main - D_guide) with this guide (a smaller or less "
                        "trained model of the same data, classes and prediction: a run, checkpoint, export "
                        "folder or Hub id) in place of the null label")
    g.add_argument("--guide-weights", metavar="W", help="the guide's --weights (default: as for --weights)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the model's forward in float32 or bf16 autocast; guidance and the sampler stay float32 "
                        "(default auto: bf16 on a GPU)")
    g.add_argument("--seed", type=int, default=0, help="grid and FID noise and labels, in [0, 2**32) (default 0)")
    g.add_argument("--batch-size", type=at_least(1), default=64, metavar="N", help="samples per model batch and FID chunk")
    g.add_argument("--fid", type=at_least(1), metavar="N", help="write N samples to an .npz instead of a grid")
    g.add_argument("--out", help="output .png (grid) or .npz (--fid); default under RUN/samples/")
    g.add_argument("--no-progress", action="store_true", help="no progress bar for --fid")
    g.add_argument("--compile", action="store_true", help="torch.compile the model's forward as one graph")
    args = p.parse_args(argv)
    args.cfg_scale_given = args.cfg_scale is not None
    if not args.cfg_scale_given:
        args.cfg_scale = CFG_SCALE["fid" if args.fid else "grid"]
    lo, hi = args.guidance_interval
    checks = [(not math.isfinite(args.cfg_scale), f"--cfg-scale {args.cfg_scale}: must be a finite number (1 = none)"),
              ((args.fid is None) == (args.class_label is None),
               "give --class-label Y [Y ...] for a grid or --fid N for an .npz (one of them)"),
              (not (args.ckpt or args.result_dir), "give --result-dir RUN (a train.py run) or --ckpt FILE"),
              (args.vae_path and not os.path.isdir(args.vae_path), f"--vae-path {args.vae_path}: not a directory"),
              (not 0 <= lo <= hi,  # True for NaN
               f"--guidance-interval {lo:g} {hi:g}: need noise levels 0 <= LO <= HI (HI may be inf)"),
              (not 0 <= args.seed < 2 ** 32, f"--seed {args.seed}: must be {SEED_RANGE}"),
              (args.guide_weights and not args.guide, "--guide-weights needs --guide"),
              (args.guide and not (os.path.exists(args.guide) or HUB_ID.fullmatch(args.guide)),
               f"--guide {args.guide}: no such run directory or checkpoint (nor export folder or Hub id)")]
    for failed, message in checks:
        if failed:
            raise UsageError(message)
    return args


def load_model(args, guide=False):
    """(model on the CPU with the chosen weights, manifest, note on the weights, stem of the default
    output path, prediction: eps, v or x0) of --ckpt or --result-dir (its latest checkpoint) with
    --weights, or with guide=True of --guide with --guide-weights. An export folder or Hub id holds one
    set of weights (--weights refused). A file that is not a train.py checkpoint may be an official DiT
    state dict (vanilla DiT --model at --image-size, SD-VAE latents)."""
    source = args.guide if guide else args.ckpt or args.result_dir
    flag = "--guide" if guide else "--ckpt" if args.ckpt else "--result-dir"
    weights = (args.guide_weights or args.weights) if guide else args.weights
    folder = export_folder(source, flag)
    if folder is not None:
        given = args.guide_weights if guide else args.weights
        if given:
            held = read_export_config(folder, source)
            raise UsageError(f"{'--guide-weights' if guide else '--weights'} {given}: {source} is an export of one "
                             f"set of weights ({held['weights']} of step {held['step']}); drop the flag")
        model, saved, manifest, note = read_export(folder, source)
        stem = os.path.join("samples", f"{os.path.basename(os.path.normpath(source))}-{saved['weights']}")
        return model, manifest, note, stem, saved["prediction"]
    path = checkpoint_file(source, flag)
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        ckpt = load_checkpoint(path)
    except UsageError as refused:
        try:
            state = read_official(path)
        except Exception:  # unreadable: runs.load_checkpoint said why
            raise refused from None
        if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise UsageError(f"{path}: neither a train.py checkpoint nor a DiT state dict") from None
        if weights not in (None, "raw"):
            raise UsageError(f"--weights {weights}: {path} is a plain state dict, one set of weights") from None
        model, manifest = official_model(args)
        load_weights(model, state, path, f"{args.model} at --image-size {args.image_size}")
        prediction = FLOW_PREDICTION if args.objective == "flow" else "eps"
        return model, manifest, f"state dict {path}", os.path.join("samples", stem), prediction
    model, saved, weights, note = run_model(ckpt, path, weights)
    stem = os.path.join(os.path.dirname(os.path.dirname(path)), "samples", f"{stem}-{weights}")
    return model, ckpt["manifest"], note, stem, saved["prediction"]


def checkpoint_file(source, flag):
    """The checkpoint a --ckpt, --result-dir or --guide names: the file, or a run directory's latest."""
    if os.path.isdir(source):
        if not checkpoints_in(source):
            raise UsageError(f"{flag} {source}: no checkpoints/NNNNNNN.pt and no {EXPORT_WEIGHTS} (not a train.py "
                             f"run, or it has not reached its first --ckpt-every; nor an export.py folder)")
        return checkpoints_in(source)[-1]
    if not os.path.isfile(source):
        raise UsageError(f"{flag} {source}: no such file")
    return source


def run_model(ckpt, path, choice):
    """(model with the weights of --weights choice, the run's saved_args, the choice's name, a note) of a
    train.py checkpoint read from path."""
    saved = saved_args(ckpt)
    model = build_model(argparse.Namespace(**saved), ckpt["manifest"])
    state, weights, note = select_weights(ckpt, path, choice, model)
    return load_weights(model, state, path, f"{saved['model']} of its run"), saved, weights, note


def load_weights(model, state, path, what):
    """model with the state dict loaded, or one line saying which model the weights of path are for."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f"{path}: does not fit {what}: it holds {describe(state)}") from None
    return model


def export_folder(source, flag):
    """The export.py folder that source names (a folder holding model.safetensors, or a Hub id owner/name
    that is no local path, fetched by huggingface_hub into its cache), else None (a run or a file)."""
    if os.path.isdir(source):
        return source if os.path.isfile(os.path.join(source, EXPORT_WEIGHTS)) else None
    if os.path.exists(source) or not HUB_ID.fullmatch(source):
        return None
    from huggingface_hub import snapshot_download  # a slow import: only where it is used
    try:
        return snapshot_download(source, allow_patterns=[EXPORT_WEIGHTS, EXPORT_CONFIG, "README.md"])
    except Exception as e:  # the Hub's errors come in many types
        raise UsageError(f"{flag} {source}: no such local path, and no Hub repository of that id could be fetched "
                         f"({type(e).__name__}); check the id, or its copy in huggingface_hub's cache") from None


def read_export(folder, source):
    """(model with the exported weights, built by runs.build_model from config.json; the arguments it was
    built from with the export's "weights" and "prediction"; the data's manifest; a note) of an export folder."""
    config = read_export_config(folder, source)
    saved = {**config["architecture"], **{k: config[k] for k in OBJECTIVE_KEYS if k in config},
             "prediction": config["prediction"], "weights": config["weights"], "data_path": source}
    path = os.path.join(folder, EXPORT_WEIGHTS)
    from safetensors.torch import load_file
    try:
        state = load_file(path)
    except Exception as e:  # a missing or torn file; safetensors' errors come in several types
        raise UsageError(f"{source}: cannot read {EXPORT_WEIGHTS} ({type(e).__name__}: {str(e)[:200]})") from None
    model = build_model(argparse.Namespace(**saved), config["data"])
    load_weights(model, state, path, f"the architecture of its {EXPORT_CONFIG}")
    return model, saved, config["data"], f"{config['weights']} weights of step {config['step']} exported to {source}"


def read_export_config(folder, source):
    """An export's config.json as a dict: refused (one line) when missing, unreadable, or of a newer format."""
    path = os.path.join(folder, EXPORT_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{source}: no {EXPORT_CONFIG} beside {EXPORT_WEIGHTS}, so the architecture is unknown; "
                         f"export the run again with export.py") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot read it ({e})") from None
    version = config.get("format") if isinstance(config, dict) else None
    if not isinstance(version, int):
        raise UsageError(f"{path}: no \"format\" number, not an export.py config; export the run again with export.py")
    if version > EXPORT_FORMAT:
        raise UsageError(f"{path}: format {version} is newer than this code reads ({EXPORT_FORMAT}); update this "
                         f"repository to load it")
    missing = [k for k in ("architecture", "prediction", "data", "weights", "step") if k not in config]
    missing += [k for k in ARCHITECTURE_KEYS if k not in config.get("architecture", {})]
    if missing:
        raise UsageError(f"{path}: no {', '.join(missing)}: not a complete export.py config; export the run again")
    return config


def official_model(args):
    """(vanilla DiT, manifest) for the official checkpoints, DiT's or (--objective flow) SiT's: 1000 classes,
    SD-VAE latents x 0.18215; SiT's model is DiT's, given t in [0, 1]."""
    if args.model not in DiT_models:
        raise UsageError(f"unknown --model {args.model!r}; choose one of {', '.join(DiT_models)}")
    side, patch = args.image_size // 8, int(args.model.split("/")[1])
    if args.image_size % 8 or side % patch:
        raise UsageError(f"--image-size {args.image_size}: the latent side (size / 8) must be a multiple of {patch}")
    manifest = {"kind": "latent", "shape": [4, side, side], "num_classes": 1000, "vae": VAES[args.vae],
                "channel_mean": [0.0] * 4, "channel_std": [1 / DIT_LATENT_SCALE] * 4}
    return DiT_models[args.model](input_size=side, t_max=T_MAX[args.objective]), manifest


def load_guide(args, manifest, prediction, num_classes):
    """(guide model on the CPU, a note on its weights, its name for the output file) for --guide; it
    must share the main model's data (kind and shape), classes and prediction type."""
    try:
        guide, guide_manifest, note, stem, guide_prediction = load_model(args, guide=True)
    except UsageError as e:
        raise UsageError(f"--guide: {e}") from None
    data = lambda m: (m["kind"], list(m["shape"]))  # noqa: E731
    for what, theirs, ours in (("data", data(guide_manifest), data(manifest)),
                               ("number of classes", guide.num_classes, num_classes),
                               ("prediction", guide_prediction, prediction)):
        if theirs != ours:
            raise UsageError(f"--guide {args.guide}: its {what} is {theirs}, the model's {ours}; "
                             f"guide with a model of the same data, classes and prediction")
    return guide, note, os.path.basename(stem)


def describe(state):
    """What a DiT state dict is for, read from its shapes, e.g. 'DiT-XL/2 for 32x32x4 inputs, 1000 classes'."""
    try:
        hidden, channels, patch = (state["x_embedder.proj.weight"].shape[i] for i in (0, 1, 2))
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        side = math.isqrt(state["pos_embed"].shape[1]) * patch
        classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, IndexError, AttributeError):
        return "no DiT weights"
    channels -= "x_embedder.proj.bias" not in state  # weight-normalised: a constant-ones channel
    size = next((s for s, (d, h, _) in MODEL_SIZES.items() if (d, h) == (depth, hidden)), None)
    name = f"DiT-{size}/{patch}" if size else f"a DiT of depth {depth}, width {hidden}, patch {patch}"
    return f"{name} for {side}x{side}x{channels} inputs, {classes} classes"


def select_weights(ckpt, path, choice, model):
    """(state dict, its name, a note) for --weights: raw, ema, or ema-<sigma_rel>."""
    tracked = {float(k): sd for k, sd in ckpt["ema_power"].items()}
    choice = choice or sampling_weights_name(tracked)
    if choice == "raw":
        return ckpt["model"], choice, f"raw weights of {path}"
    if choice == "ema":
        decay, step = ckpt["args"].get("ema_decay"), ckpt["step"]
        if decay is not None and decay ** step >= EMA_INIT_WARNING:  # ema = decay^step init + sum of updates
            warn(f"the classic EMA (decay {decay}) at step {step} still holds {decay ** step:.0%} of the initial "
                 f"(random) weights (decay^steps), so its samples are mostly noise; use --weights ema-<sigma_rel> "
                 f"(a power EMA) or raw, or train past ~{math.log(1 / EMA_INIT_WARNING) / (1 - decay):.0f} steps")
        return ckpt["ema"], choice, f"classic EMA (decay {decay}) of {path}"
    match = POWER_EMA.fullmatch(choice)
    if not match:
        raise UsageError(f"--weights {choice}: use raw, ema, or ema-<sigma_rel> such as ema-0.07")
    sigma = float(match[1])
    if not valid_sigma_rel(sigma):
        raise UsageError(f"--weights {choice}: no power EMA has sigma_rel {sigma} (about 0 < sigma_rel < 0.3)")
    if sigma in tracked:
        return tracked[sigma], choice, f"power EMA sigma_rel={sigma} (tracked) of {path}"
    state, note = posthoc_ema(ckpt, path, sigma, model)
    low, high = min(tracked, default=sigma), max(tracked, default=sigma)
    if not low <= sigma <= high:
        warn(f"--weights {choice}: sigma_rel {sigma} is outside the tracked range [{low}, {high}] "
             f"(--ema-sigma-rels of the run), so the post-hoc EMA extrapolates and need not resemble an EMA of "
             f"that width (see its weights' range below); choose a sigma_rel in [{low}, {high}]")
    return state, choice, note


def warn(message):
    """A warning on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"sample.py: warning: {message}", file=sys.stderr)


def posthoc_ema(ckpt, path, sigma_rel, model):
    """(state, note): the power EMA of sigma_rel at the checkpoint's step, sum_i w_i state_i over every
    power-EMA snapshot up to it (ema-snapshot-NNNNNNN.pt beside it, and its own) in float64, with the
    least-squares weights divided by their sum (each snapshot averages with total weight 1; with few
    snapshots the sum misses 1 by more than the tracked EMAs differ). Untrained tensors are kept."""
    if not ckpt["ema_power"]:
        raise UsageError(f"{path}: no power-EMA snapshots for a post-hoc EMA (the run tracked none; "
                         f"see train.py --ema-sigma-rels); use --weights raw or ema")
    step, keys = ckpt["step"], sorted(ckpt["ema_power"], key=float)
    files = glob.glob(os.path.join(os.path.dirname(path), "ema-snapshot-" + "[0-9]" * 7 + ".pt"))
    sources = sorted((int(os.path.basename(f)[13:20]), f) for f in files)
    sources = [(s, f) for s, f in sources if s < step] + [(step, path)]
    fitted = posthoc_coefficients(np.repeat([s for s, _ in sources], len(keys)),
                                  [float(k) for k in keys] * len(sources), step, sigma_rel)
    weights = (fitted / fitted.sum()).reshape(len(sources), len(keys))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    state = dict(ckpt["ema_power"][keys[0]])
    total = {n: torch.zeros_like(state[n], dtype=torch.float64) for n in trainable}
    for (s, file), row in zip(sources, weights):
        snapshot = ckpt if file == path else load_checkpoint(file, keys=SNAPSHOT_KEYS, what="snapshot")
        for k, w in zip(keys, row):
            for n in trainable:
                value = snapshot["ema_power"][k][n]
                if not torch.isfinite(value).all():
                    raise UsageError(f"{file}: power EMA {k} holds NaN or inf ({n}); a post-hoc EMA cannot use "
                                     f"it: the run diverged by step {s}, sample from an earlier checkpoint")
                total[n] += w * value.double()
    state.update({n: total[n].to(state[n].dtype) for n in trainable})
    note = (f"post-hoc power EMA sigma_rel={sigma_rel} at step {step} from {len(sources)} snapshot(s) of steps "
            f"{sources[0][0]}..{step} (least-squares weights in [{weights.min():+.3f}, {weights.max():+.3f}], "
            f"their sum {fitted.sum():.4f} divided out)")
    return state, note


def choose_sampler(args, prediction):
    """(the sampler of --sampler, --num-sampling-steps and --time-shift for a model predicting `prediction`,
    its objective); the objective's defaults are filled into args (the output's name, the --fid settings)."""
    objective = objective_of(prediction)
    args.sampler = args.sampler or DEFAULT_SAMPLER[objective]
    if args.sampler not in SAMPLERS[objective]:
        raise UsageError(f"--sampler {args.sampler}: this is a {objective} model; choose one of "
                         f"{', '.join(SAMPLERS[objective])}")
    if args.sampler == "dopri5" and args.num_sampling_steps:
        raise UsageError("--num-sampling-steps: dopri5 chooses its own steps (atol 1e-6, rtol 1e-3); drop the flag")
    args.num_sampling_steps = args.num_sampling_steps or DEFAULT_STEPS[args.sampler]
    if objective == "ddpm" and args.num_sampling_steps > 1000:
        raise UsageError("--num-sampling-steps: at most the 1000 training steps")
    if objective == "ddpm" and args.time_shift != 1:
        raise UsageError("--time-shift shifts a flow model's time grid; this is a DDPM model")
    return make_sampler(args.sampler, args.num_sampling_steps, prediction, args.time_shift), objective


def default_out(args, stem, guide_stem):
    """STEM-<sampler><steps>[-shift<S>]-cfg<scale>[-ch<K>][-sigma<LO>-<HI>][-guide-<guide>]-seed<seed> + .png
    or -fid<N>.npz."""
    lo, hi = args.guidance_interval
    return (f"{stem}-{args.sampler}{args.num_sampling_steps or ''}"
            + (f"-shift{args.time_shift:g}" if args.time_shift != 1 else "") + f"-cfg{args.cfg_scale:g}"
            + (f"-ch{args.cfg_channels}" if args.cfg_channels else "")
            + (f"-sigma{lo:g}-{hi:g}" if (lo, hi) != EVERY_STEP else "")
            + (f"-guide-{guide_stem}" if guide_stem else "") + f"-seed{args.seed}"
            + (f"-fid{args.fid}.npz" if args.fid else ".png"))


def write_grid(args, generate, manifest, path):
    """PNG with one row of --num-samples images per class label, named from the manifest's class names;
    batch k uses chunk_inputs(seed, k)."""
    labels = torch.tensor(args.class_label).repeat_interleave(args.num_samples)
    images = [generate(chunk_inputs(args.seed, k, len(y), tuple(manifest["shape"]))[0], y)
              for k, y in enumerate(labels.split(args.batch_size))]
    save_grid(np.concatenate(images), len(args.class_label), path, row_names(manifest, args.class_label))


def write_fid_npz(args, generate, path, settings):
    """--fid samples in chunk files (PATH-chunks/NNNNNN.npz, a data.ChunkFolder: a rerun with the same
    settings resumes, with others is refused; rank r makes its missing chunks), merged into PATH by
    rank 0. generate(k, n): (images, labels) of chunk k."""
    chunks = ChunkFolder(path[: -len(".npz")] + "-chunks", settings)
    sizes = chunk_sizes(args.fid, args.batch_size)
    for k, bar in chunks_to_do(sizes, chunks, progress=not args.no_progress):
        images, labels = generate(k, sizes[k])
        chunks.save(k, images=images, labels=labels)
        bar.update(sizes[k])
    barrier()
    if rank_world()[0] == 0:
        write_npz_samples(path, np.concatenate([chunks.load(k)["images"] for k in range(len(sizes))]))


def check_writable(out):
    """Refuse an output path that cannot be written before sampling starts."""
    if os.path.isdir(out):
        raise UsageError(f"--out {out}: is a directory; give a file name (.png, or .npz with --fid)")
    probe = f"{out}.{os.getpid()}.probe"
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def main(args):
    rank, world, device = setup_distributed()
    try:
        model, manifest, note, stem, prediction = load_model(args)
        bad = [y for y in args.class_label or [] if not 0 <= y < model.num_classes]
        if bad:
            raise UsageError(f"--class-label {bad[0]}: outside [0, {model.num_classes})")
        if (args.cfg_channels or 0) > manifest["shape"][0]:
            raise UsageError(f"--cfg-channels {args.cfg_channels}: the model has {manifest['shape'][0]} channels")
        sampler, objective = choose_sampler(args, prediction)
        guide, guide_note, guide_stem = (load_guide(args, manifest, prediction, model.num_classes) if args.guide
                                         else (None, None, None))
        vae = open_decoder(manifest, args.vae_path)
        vae = vae and vae.to(device)
        for m in [m for m in (model, guide) if m is not None]:
            m.to(device).eval().requires_grad_(False)  # frozen: MPLinear caches its weights
            if args.compile:  # Guided calls the modules, so guidance runs compiled too
                m.forward = torch.compile(m.forward, fullgraph=True)
        guided = Guided(model, args.cfg_scale, guide, tuple(args.guidance_interval), args.cfg_channels, objective)
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out = args.out or default_out(args, stem, guide_stem)
        if args.fid and not out.endswith(".npz"):
            out += ".npz"
        if rank == 0:
            scale = f"guidance scale {args.cfg_scale:g}" + ("" if args.cfg_scale_given else
                                                            f" (the {'--fid' if args.fid else 'grid'} default)")
            print(f"sampling {manifest['shape']} ({manifest['kind']}) with {note}, {scale}"
                  + (f"\nguided by {guide_note}" if guide is not None else ""))
        check_writable(out)
        try:  # non-finite samples would be saved as black images
            if args.fid:
                settings = {k: v for k, v in vars(args).items() if k not in NOT_SAMPLE_SETTINGS}
                write_fid_npz(args, lambda k, n: sample_chunk(guided, sampler, manifest, args.seed, k, n, vae, bf16),
                              out, dict(settings, source=stem))
            elif rank == 0:
                write_grid(args, lambda z, y: sample_images(guided, sampler, z.to(device), y, manifest, vae, bf16),
                           manifest, out)
        except FloatingPointError as e:
            raise UsageError(f"{e} with {note}; nothing of this batch was written: check "
                             f"the weights (--weights) and the settings") from None
        if rank == 0:
            print(f"wrote {out}")
    finally:
        if world > 1:
            dist.destroy_process_group()
    return out


def cli(argv=None):
    """sample.py as a command: 0; bad input one line and 2."""
    return run_command("sample.py", lambda argv: main(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(cli())
