"""What benchmarks/bench.py and benchmarks/gpu_check.py both measure with: the fixed inputs of a
model (Ctx), train.py's training step (TrainStep) and the sampling forward (InferStep), timing,
forward FLOPs and the machine's description."""
import contextlib
import copy
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import create_diffusion
from ema import ema_update, frozen_copy, power_beta, sigma_rel_to_gamma
from models import DiT_models
from mp_layers import force_normalize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Forward GMACs per image (4 latent channels, learned sigma): the "Gflops" of the DiT paper (Peebles &
# Xie 2023; they count multiply-accumulates) at 256 px (32x32 latents), and the same count at 128 px.
GMACS = {("DiT-S/2", 16): 1.41, ("DiT-S/2", 32): 6.06, ("DiT-B/2", 16): 5.56, ("DiT-B/2", 32): 23.0,
         ("DiT-L/2", 16): 19.7, ("DiT-L/2", 32): 80.7, ("DiT-XL/2", 16): 29.0, ("DiT-XL/2", 32): 118.6}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
POWER_SIGMA_RELS = (0.05, 0.10)  # train.py's default power EMAs, beside the classic 0.9999 one


class Ctx:
    """Device, precision and the fixed inputs shared by every configuration of one model. args needs
    seed, precision, compile, grad_checkpoint and plain_forward; overrides (e.g. depth, hidden_size,
    num_heads) go to every model built; compile_backend is torch.compile's backend (with args.compile)."""

    def __init__(self, args, device, name, size, batch, channels, num_classes, overrides=None,
                 compile_backend="inductor"):
        self.args, self.device, self.name, self.size, self.batch = args, device, name, size, batch
        self.overrides, self.compile_backend = overrides or {}, compile_backend
        self.channels, self.num_classes = channels, num_classes
        bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        g = torch.Generator().manual_seed(args.seed)
        self.x = torch.randn(batch, channels, size, size, generator=g).to(device)
        self.noise = torch.randn(batch, channels, size, size, generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        self.drop = (torch.rand(batch, generator=g) < 0.1).long().to(device)
        half = batch // 2  # classifier-free guidance: conditional half, then the same latents unconditional
        self.y_cfg = torch.cat([self.y[:half], torch.full_like(self.y[half:], num_classes)])
        self.diffusion = create_diffusion(timestep_respacing="")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def build(self, kwargs):
        torch.manual_seed(self.args.seed)
        kwargs = {**self.overrides, **kwargs}
        original = kwargs.pop("original_layers", False)
        model = DiT_models[self.name](input_size=self.size, in_channels=self.channels,
                                      num_classes=self.num_classes, **kwargs)
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
    model.x_embedder = swap(model.x_embedder, PatchEmbed(ctx.size, p, ctx.channels, d, bias=True))
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
    """One step of train.py: hybrid diffusion loss, backward, Adam(W), forced weight normalisation,
    classic EMA and two power EMAs (train.py takes the gradient norm only to clip or log it)."""

    def __init__(self, ctx, kwargs):
        self.ctx, mem0 = ctx, torch.cuda.memory_allocated() if ctx.device.type == "cuda" else 0
        self.model = model = ctx.build(kwargs)
        model.grad_checkpoint = self.checkpointing = ctx.args.grad_checkpoint
        self.act_mb = saved_activation_mb(ctx, model)
        self.emas = [frozen_copy(model) for _ in range(1 + len(POWER_SIGMA_RELS))]
        self.gammas = [sigma_rel_to_gamma(s) for s in POWER_SIGMA_RELS]
        kernel = dict(fused=True) if ctx.device.type == "cuda" else dict(foreach=True)
        if model.switches.use_weight_normalization:  # lr is irrelevant to speed; fixed for all
            self.opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), **kernel)
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **kernel)
        if ctx.args.compile:
            model.forward = torch.compile(model.forward, backend=ctx.compile_backend)
        self.steps, self.peak_gb = 0, None
        self()  # creates the optimiser state
        if ctx.device.type == "cuda":  # peak = own persistent state + transient peak of one step
            ctx.sync()
            persistent = torch.cuda.memory_allocated() - mem0
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self()
            ctx.sync()
            self.peak_gb = (persistent + torch.cuda.max_memory_allocated() - before) / 2**30

    def __call__(self):
        c, model = self.ctx, self.model
        with c.autocast():
            losses = c.diffusion.training_losses(model, c.x, c.t, dict(y=c.y, force_drop_ids=c.drop), noise=c.noise)
        losses["loss"].mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        force_normalize_(model)
        self.steps += 1
        ema_update(self.emas[0], model, 0.9999)
        for ema, gamma in zip(self.emas[1:], self.gammas):
            ema_update(ema, model, power_beta(self.steps, gamma))


class InferStep:
    """The sampling cost: forward_with_cfg (or a plain forward) of a frozen eval-mode copy under no_grad."""

    def __init__(self, ctx, kwargs):
        self.ctx, self.model = ctx, frozen_copy(ctx.build(kwargs))
        if ctx.args.compile:
            self.model.forward = torch.compile(self.model.forward, backend=ctx.compile_backend)

    @torch.no_grad()
    def __call__(self):
        c = self.ctx
        with c.autocast():
            if c.args.plain_forward:
                self.model(c.x, c.t, c.y)
            else:
                self.model.forward_with_cfg(c.x, c.t, c.y_cfg, cfg_scale=4.0)


def timed(ctx, step, iters):
    """Seconds for `iters` calls of step (the device synchronised before and after)."""
    ctx.sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    ctx.sync()
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
    if key in GMACS and ctx.channels == 4 and not ctx.overrides:
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
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", cpu=cpu,
                cpu_count=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                commit=git("rev-parse", "--short", "HEAD"), dirty=bool(git("status", "--porcelain", "-uno")),
                load_avg=os.getloadavg())
