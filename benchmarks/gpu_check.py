"""The first look at a GPU, in one run of under 5 minutes on one H200: does every GPU-only path work,
and how fast is it. Writes a markdown block for benchmarks/RESULTS.md.

    python benchmarks/gpu_check.py --out-md $OUT/gpu_check.md      # on the GPU (DiT-XL/2, 32x32 latents)
    python benchmarks/gpu_check.py --tiny                          # the same script on a CPU, tiny models

First bf16 TFLOP/s of large matrix multiplies (the peak a model can hope for; nominal H200: 989), then
the --sections in this order, each skipped (and said so) once the --budget-s left is too short for it:
  train       train.py's step (bf16 autocast, fused Adam, forced normalisation, three EMAs) of DiT-XL/2
              at 32x32x4 latents, batch 256 (halved until it fits), vanilla and MaP: images/s, MFU
              against the nominal and the measured matmul peak, MaP / vanilla, peak memory
  torchrun    `torchrun --nproc_per_node=1 train.py` (NCCL on a GPU, gloo on a CPU) on the demo data:
              2 steps with a checkpoint, then --resume to 4 steps from it
  sample      guided DPM-Solver++ (25 steps, cfg 4, sample.py's sampler) images/s, vanilla and MaP;
              DDIM-25 (the same 25 guided forwards) where diffusers is not installed
  checkpoint  the train step with --grad-checkpoint: peak memory and the speed it costs
  compile     the train step with the model's forward torch.compile'd (inductor; aot_eager with
              --tiny), with the seconds spent compiling: last, as the least predictable in time
The markdown is rewritten after every section, so a run cut short still leaves what it measured.
If the budget skipped sections, run them in a second call: --sections checkpoint compile.
"""
import argparse
import gc
import glob
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from harness import PEAK_TFLOPS, Ctx, TrainStep, forward_gmacs, halving_on_oom, machine_info, timed  # noqa: E402

TINY = dict(depth=2, hidden_size=64, num_heads=2)  # --tiny: DiT-XS/2 at 8x8 latents, batch 8
CONFIGS = {"vanilla": {}, "MaP": dict(mp=True)}
SECTIONS = {"train": ("train step, eager", 60), "torchrun": ("torchrun train.py, 1 process", 60),
            "sample": ("guided sampling", 30), "checkpoint": ("train step, eager, --grad-checkpoint", 50),
            "compile": ("train step, torch.compile (inductor)", 120)}  # title, about the seconds it needs on an H200
TRAIN_HEADER = ["| config | batch | train img/s | / vanilla | MFU (nominal, matmul peak) | peak GB | set-up s |",
                "|---|---|---|---|---|---|---|"]
TRAIN_ARGS = ["--depth", "2", "--hidden-size", "64", "--num-heads", "2", "--global-batch-size", "8",
              "--num-workers", "0", "--log-every", "1", "--monitor-every", "2", "--sample-steps", "2",
              "--warmup-steps", "0", "--decay-steps", "0"]  # the torchrun run: a constant lr, so 2 + 2 steps = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="CPU check of the script itself: DiT-XS/2 at depth 2, width 64 on 8x8 latents, batch 8, fp32")
    p.add_argument("--model", default="DiT-XL/2", help="model of the train, sample and compile sections")
    p.add_argument("--size", type=int, default=32, help="latent side (32 = 256 px)")
    p.add_argument("--batch", type=int, default=256, help="train batch (halved until it fits)")
    p.add_argument("--sample-batch", type=int, default=64, help="images per sampling batch (2x rows with guidance)")
    p.add_argument("--iters", type=int, default=5, help="timed train steps per configuration")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                   help="what to run, in this order (default all)")
    p.add_argument("--budget-s", type=float,
                   help="start no section that would end after this many seconds (default 285; --tiny 1200)")
    p.add_argument("--out-md", help="write the markdown block here too (rewritten after every section)")
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.size, args.batch, args.sample_batch, args.iters = "DiT-XS/2", 8, 8, 4, 2
    if args.budget_s is None:
        args.budget_s = 1200 if args.tiny else 285
    return args


class Report:
    """Markdown lines, printed and (with --out-md) written atomically after every section."""

    def __init__(self, path, start):
        self.path, self.start, self.lines = path, start, []

    def add(self, *lines):
        self.lines += lines
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                f.write("\n".join(self.lines) + "\n")
            os.replace(self.path + ".tmp", self.path)

    def elapsed(self):
        return time.perf_counter() - self.start


def matmul_tflops(device, tiny):
    """TFLOP/s of n x n x n multiplies (bf16 on a GPU, fp32 on a CPU), best of 3 timings."""
    n, dtype = (1024, torch.float32) if tiny or device.type == "cpu" else (8192, torch.bfloat16)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best / 1e12, f"{n}x{n}x{n} {str(dtype)[6:]}"


def context(args, device, batch, grad_checkpoint=False, compile=False):
    opts = argparse.Namespace(seed=0, precision="auto", compile=compile, grad_checkpoint=grad_checkpoint,
                              plain_forward=False)
    return Ctx(opts, device, args.model, args.size, batch, 4, 1000, TINY if args.tiny else None,
               "aot_eager" if args.tiny else "inductor")


def train_rows(args, device, peaks, grad_checkpoint=False, compile=False):
    """One markdown row per configuration of the train step: img/s, MFU, ratio to vanilla, peak GB."""
    return [*TRAIN_HEADER, *halving_on_oom(lambda batch: train_configs(
        context(args, device, batch, grad_checkpoint, compile), args, peaks), args.batch, device, args.model)]


def train_configs(ctx, args, peaks):
    gmacs = forward_gmacs(ctx)[0]
    rows, speed = [], {}
    for name, kwargs in CONFIGS.items():
        t0 = time.perf_counter()
        step = TrainStep(ctx, kwargs)  # runs two steps: optimiser state, peak memory (and compiling)
        setup_s = time.perf_counter() - t0
        times = [timed(ctx, step, 1) for _ in range(args.iters)]
        speed[name] = ctx.batch / statistics.median(times)
        mfu = ", ".join(f"{speed[name] * 6 * gmacs * 1e9 / (p * 1e12):.1%}" for p in peaks) if peaks else "n/a"
        peak = f"{step.peak_gb:.1f}" if step.peak_gb else "n/a"
        rows.append(f"| {name} | {ctx.batch} | {speed[name]:.1f} | {speed[name] / speed['vanilla']:.3f} | {mfu} "
                    f"| {peak} | {setup_s:.0f} |")
        del step
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def torchrun_check():
    """train.py under torchrun, 1 process: 2 steps with a checkpoint, then --resume to 4 steps."""
    results = tempfile.mkdtemp(prefix="gpu-check-")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            os.path.join(ROOT, "train.py"), "--results-dir", results, *TRAIN_ARGS]
    try:
        lines = []
        first = subprocess.run([*base, "--num-steps", "2", "--ckpt-every", "2"], capture_output=True, text=True,
                               timeout=240)
        runs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(results, "*", "config.json")))
        if first.returncode or not runs:
            return [f"- first run: **failed**, exit {first.returncode}: `{tail(first)}`"]
        lines.append(f"- first run: exit 0, checkpoints {names(runs[0])}")
        second = subprocess.run([*base, "--num-steps", "4", "--ckpt-every", "2", "--resume", runs[0]],
                                capture_output=True, text=True, timeout=240)
        with open(os.path.join(runs[0], "log.txt")) as f:
            resumed = [line.split("] ", 1)[1].strip() for line in f if "resumed at" in line]
        ok = second.returncode == 0 and resumed and os.path.exists(os.path.join(runs[0], "checkpoints", "0000004.pt"))
        lines.append(f"- resumed run: exit {second.returncode}, {resumed[-1] if resumed else 'no resume logged'}, "
                     f"checkpoints {names(runs[0])}: **{'ok' if ok else 'failed'}**"
                     + ("" if ok else f": `{tail(second)}`"))
        return lines
    finally:
        shutil.rmtree(results, ignore_errors=True)


def names(run_dir):
    return ", ".join(os.path.basename(p) for p in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))))


def tail(completed):
    return " / ".join((completed.stderr or completed.stdout).strip().splitlines()[-3:])[-400:]


@torch.no_grad()
def sampling_rows(args, device):
    """Guided sampling images/s with sample.py's sampler and bf16 autocast on a GPU, vanilla and MaP."""
    import sampling  # noqa: E402  (sample.py's sampler, the one sampling runs)
    from guidance import Guided  # noqa: E402
    name, steps = ("dpm++" if importlib.util.find_spec("diffusers") else "ddim"), 25
    steps = 5 if args.tiny else steps
    sampler = sampling.make_sampler(name, steps)
    rows = ["| config | sampler | images | images/s |", "|---|---|---|---|"]
    for config, kwargs in CONFIGS.items():
        ctx = context(args, device, args.sample_batch)
        model = ctx.build(kwargs).eval().requires_grad_(False)
        z = torch.randn(args.sample_batch, 4, args.size, args.size, device=device)
        guided, y = Guided(model, 4.0), ctx.y[:args.sample_batch]

        def run():
            sampling.denoise(guided, sampler, z, y, bf16=device.type == "cuda")
        run()  # warm-up
        seconds = min(timed(ctx, run, 1) for _ in range(2))
        rows.append(f"| {config} | {name} {steps} | {args.sample_batch} | {args.sample_batch / seconds:.2f} |")
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    report = Report(args.out_md, time.perf_counter())
    m = machine_info(device)
    report.add(f"## GPU check, {m['date']}", "",
               f"`python benchmarks/gpu_check.py{' --tiny' if args.tiny else ''}`: {m['device']} ({m['cpu']}, "
               f"{m['cpu_count']} cores), torch {m['torch']}, commit {m['commit']}{' + local changes' if m['dirty'] else ''}; "
               f"{args.model} at {args.size}x{args.size}x4 latents{', depth 2, width 64, 2 heads (--tiny)' if args.tiny else ''}.",
               "")
    nominal = next((v for k, v in PEAK_TFLOPS.items() if k in m["device"]), None)
    measured, shape = matmul_tflops(device, args.tiny)
    report.add(f"matmul {shape}: {measured:.3g} TFLOP/s", "")
    peaks = [p for p in (nominal, measured) if p and device.type == "cuda"]
    runs = dict(train=lambda: train_rows(args, device, peaks), torchrun=torchrun_check,
                sample=lambda: sampling_rows(args, device),
                checkpoint=lambda: train_rows(args, device, peaks, grad_checkpoint=True),
                compile=lambda: train_rows(args, device, peaks, compile=True))
    for section in args.sections:
        title, needs_s = SECTIONS[section]
        title = title.replace("inductor", "aot_eager") if args.tiny else title
        left = args.budget_s - report.elapsed()
        if left < needs_s:
            report.add(f"{title}: skipped, {left:.0f} s of --budget-s left (needs about {needs_s})", "")
            continue
        t0 = time.perf_counter()
        try:
            lines = runs[section]()
        except Exception as e:  # a failed section is a finding; the others still run
            lines = [f"**failed**: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"]
        report.add(f"{title} ({time.perf_counter() - t0:.0f} s):", "", *lines, "")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.add(f"Total {report.elapsed():.0f} s. MFU: img/s x 3 x 2 x forward GMACs / peak (MaP on the vanilla "
               f"FLOP count); peak GB: the configuration's weights, Adam state and EMAs plus one step's peak.")
    print("\n".join(report.lines))


if __name__ == "__main__":
    main()
