"""What the benchmarks measure with: the device set-up, the fixed inputs of a model (Ctx), train.py's
training step itself (TrainStep), the sampling forward (InferStep) and sampling loop (SampleStep),
timing, forward FLOPs, the machine's description and markdown tables."""
import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import runs  # noqa: E402
import sampling  # noqa: E402
import train  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from ema import frozen_copy  # noqa: E402
from guidance import Guided  # noqa: E402
from models import DiT_models  # noqa: E402

# Forward GMACs per image (4 latent channels, learned sigma): the "Gflops" of the DiT paper (Peebles &
# Xie 2023; they count multiply-accumulates) at 256 px (32x32 latents), and the same count at 128 px.
GMACS = {("DiT-S/2", 16): 1.41, ("DiT-S/2", 32): 6.06, ("DiT-B/2", 16): 5.56, ("DiT-B/2", 32): 23.0,
         ("DiT-L/2", 16): 19.7, ("DiT-L/2", 32): 80.7, ("DiT-XL/2", 16): 29.0, ("DiT-XL/2", 32): 118.6}
CONFIGS = {"vanilla": {}, "MaP": {"mp": True}}  # what every benchmark compares: DiT keyword arguments
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
MODEL_OPTIONS = dict(seed=0, precision="auto", compile=False, compile_backend="inductor", grad_checkpoint=False,
                     plain_forward=False, channels=4, num_classes=1000, overrides={})  # what Ctx reads from args


def setup(threads=None, cpu=False):
    """The device (a GPU unless cpu or none), TF32 as train.py sets it, and the CPU threads: `threads`,
    else torch's choice less the cores that other jobs keep busy (1-minute load average), said so."""
    busy = round(os.getloadavg()[0])  # more threads than free cores stall on the parked one
    auto = max(1, min(torch.get_num_threads(), os.cpu_count() - busy))
    if not threads and auto < torch.get_num_threads():
        print(f"note: load average {os.getloadavg()[0]:.1f} from other jobs: {auto} thread(s) instead of "
              f"{torch.get_num_threads()} (--threads overrides)", file=sys.stderr)
    torch.set_num_threads(threads or auto)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


class Ctx:
    """Device, precision and the fixed inputs (x, noise, t, y, label-drop mask) of `batch` items shared
    by every configuration of one model. self.args: MODEL_OPTIONS, replaced by those of args and then
    by `options` (overrides go to every model built, e.g. depth; compile_backend is torch.compile's
    backend with compile)."""

    def __init__(self, device, name, size, batch, args=None, **options):
        args = argparse.Namespace(**{**MODEL_OPTIONS, **vars(args or argparse.Namespace()), **options})
        self.args, self.device, self.name, self.size, self.batch = args, device, name, size, batch
        self.autocast = train.autocast_for(args, device)
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        g, shape = torch.Generator().manual_seed(args.seed), (batch, args.channels, size, size)
        self.x, self.noise = (torch.randn(shape, generator=g).to(device) for _ in range(2))
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.y = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
        self.drop = (torch.rand(batch, generator=g) < 0.1).long().to(device)
        self.diffusion = create_diffusion(timestep_respacing="")

    def build(self, kwargs):
        torch.manual_seed(self.args.seed)
        kwargs = {**self.args.overrides, **kwargs}
        original = kwargs.pop("original_layers", False)
        model = DiT_models[self.name](input_size=self.size, in_channels=self.args.channels,
                                      num_classes=self.args.num_classes, **kwargs)
        return (with_original_layers(model, self) if original else model).to(self.device)


def with_original_layers(model, ctx):
    """Vanilla DiT with the layers the original DiT code takes from timm (PatchEmbed, Attention with a
    qkv bias, Mlp with tanh GELU) in place of ours, holding the same weights: the original model's
    speed, side by side. Checked to give the same output before it is timed."""
    from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
    reference = copy.deepcopy(model).eval()
    d, p = model.x_embedder.proj.out_channels, model.patch_size

    def swap(old, new):
        new.load_state_dict(old.state_dict())
        return new
    model.x_embedder = swap(model.x_embedder, PatchEmbed(ctx.size, p, ctx.args.channels, d, bias=True))
    for block in model.blocks:
        block.attn = swap(block.attn, Attention(d, num_heads=model.num_heads, qkv_bias=True))
        block.mlp = swap(block.mlp, Mlp(d, hidden_features=block.mlp.fc1.out_features,
                                        act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0))
    x, t, y = ctx.x[:2].cpu(), ctx.t[:2].cpu(), ctx.y[:2].cpu()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t, y), reference(x, t, y), rtol=1e-4, atol=1e-4)
    return model.train()


def saved_activation_mb(ctx, model):
    """MB of tensors autograd saves for backward in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx.autocast():
        ctx.diffusion.training_losses(model, ctx.x, ctx.t, dict(y=ctx.y, force_drop_ids=ctx.drop), noise=ctx.noise)
    return sum(storages.values()) / 2**20


class TrainStep:
    """train.py's optimiser step itself (train.train_step: hybrid diffusion loss, backward, Adam(W),
    forced weight normalisation, the classic EMA and the power EMAs of train.py's defaults) on ctx's
    fixed micro-batch; the gradient norm only as train.py takes it (to clip or log)."""

    def __init__(self, ctx, kwargs):
        self.ctx, mem0 = ctx, torch.cuda.memory_allocated() if ctx.device.type == "cuda" else 0
        model = ctx.build(kwargs)
        model.grad_checkpoint = self.checkpointing = ctx.args.grad_checkpoint
        self.act_mb = saved_activation_mb(ctx, model)
        self.args = train.parse_args(["--lr", "1e-4", "--eval-every", "0"])  # lr is irrelevant to speed
        self.state = runs.TrainingState(model=model, ema=frozen_copy(model), opt=train.make_optimizer(model, self.args, ctx.device),
                                        ema_power={sr: frozen_copy(model) for sr in self.args.ema_sigma_rels}, step=0)
        self.net = torch.compile(model, backend=ctx.args.compile_backend) if ctx.args.compile else model
        self.batch = [(ctx.x, ctx.t, ctx.y, ctx.drop, ctx.noise)]
        self.peak_gb = None
        self()  # creates the optimiser state
        if ctx.device.type == "cuda":  # peak = own persistent state + transient peak of one step
            sync(ctx.device)
            persistent = torch.cuda.memory_allocated() - mem0
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self()
            sync(ctx.device)
            self.peak_gb = (persistent + torch.cuda.max_memory_allocated() - before) / 2**30

    def __call__(self):
        train.train_step(self.state, self.net, self.ctx.diffusion, self.batch, self.args, self.ctx.autocast)


class InferStep:
    """The sampling cost: a classifier-free-guided step (guidance.Guided on half the batch: one forward of
    the whole batch, [cond; null-label] rows) or a plain forward, of a frozen eval-mode copy under no_grad."""

    def __init__(self, ctx, kwargs):
        self.ctx, self.model = ctx, frozen_copy(ctx.build(kwargs))
        if ctx.args.compile:
            self.model.forward = torch.compile(self.model.forward, backend=ctx.args.compile_backend)
        self.guided = Guided(self.model, 4.0)

    @torch.no_grad()
    def __call__(self):
        c = self.ctx
        with c.autocast():
            if c.args.plain_forward:
                self.model(c.x, c.t, c.y)
            else:
                half = len(c.x) // 2
                self.guided(c.x[:half], c.t[:half], c.y[:half])


class SampleStep:
    """A whole sampling loop as sample.py runs it (sampling.denoise with guidance.Guided at `scale`;
    bf16 forwards as ctx's precision) from fixed noise of n images, of a frozen copy of the model."""

    def __init__(self, ctx, kwargs, sampler, n, scale):
        self.ctx, self.sampler = ctx, sampler
        self.guided = Guided(frozen_copy(ctx.build(kwargs)), scale)
        g = torch.Generator().manual_seed(ctx.args.seed)
        self.z = torch.randn(n, ctx.args.channels, ctx.size, ctx.size, generator=g).to(ctx.device)
        self.y = torch.randint(0, ctx.args.num_classes, (n,), generator=g).to(ctx.device)

    def __call__(self):
        sampling.denoise(self.guided, self.sampler, self.z, self.y, bf16=self.ctx.bf16)


def halving_on_oom(run, batch, device, what):
    """run(batch); after a CUDA out-of-memory error, again at half the batch (down to 2)."""
    while True:
        try:
            return run(batch)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda" or batch <= 2:
                raise
        free(device)  # outside the except clause, so that no traceback holds the models any more
        print(f"{what}: out of memory at batch {batch}; halving", file=sys.stderr)
        batch //= 2


def free(device):
    """Collect the objects dropped (models, optimiser states) and hand their GPU memory back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, step, iters=1):
    """Seconds for `iters` calls of step (the device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return time.perf_counter() - start


def summary(values):
    s = sorted(values)
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return dict(median=statistics.median(s), min=s[0], max=s[-1], q1=q[0], q3=q[2], values=values)


def forward_gmacs(ctx):
    """(GMACs per image of one forward, source, FlopCounterMode's count): the table above, else the count."""
    model = ctx.build({}).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ctx.x[:1], ctx.t[:1], ctx.y[:1])
    counted = counter.get_total_flops() / 2e9
    key = (ctx.name, ctx.size)
    if key in GMACS and ctx.args.channels == 4 and not ctx.args.overrides:
        return GMACS[key], "DiT's table", counted
    return counted, "FlopCounterMode", counted


def machine_info(device):
    def git(*cmd):  # read-only queries; --no-optional-locks keeps git from rewriting its index
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return dict(device=name, cpu=cpu, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                commit=git("rev-parse", "--short", "HEAD"), dirty=bool(git("status", "--porcelain", "-uno")),
                load_avg=os.getloadavg(), peak_tflops=next((v for k, v in PEAK_TFLOPS.items() if k in name), None))


def machine_line(m):
    """'device (cpu, N cores, T threads), torch V, commit C, load average at start L' of machine_info."""
    return (f"{m['device']} ({m['cpu']}, {m['cpu_count']} cores, {m['threads']} threads), torch {m['torch']}, commit "
            f"{m['commit']}{' + local changes' if m['dirty'] else ''}, load average at start {m['load_avg'][0]:.1f}")


def table(header, rows):
    """Markdown table lines: the header, its rule, then one line per row of cells."""
    return [f"| {' | '.join(map(str, row))} |" for row in (header, ["---"] * len(header), *rows)]
