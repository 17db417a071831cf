"""Magnitude-preserving (MP) primitives after EDM2 (Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models").

Every function and module here maps unit-variance input to unit-variance output at
initialisation; the formula is in each docstring. Norms are taken in float32 even under bf16/fp16
autocast (fp16 norms overflow to inf and give NaNs).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_EPS = 1e-4  # EDM2's eps in x / (eps + ||x|| / sqrt(n))
HAND_BACKWARD = True  # the exact hand-written backward passes at the end of this file; False: plain autograd


def normalize(x, dim=None, eps=NORM_EPS, gain=1.0):
    """gain * x / (eps + ||x|| / sqrt(n)) over `dim` (default: all but dim 0, i.e. per output row).

    Rows come out at RMS `gain` (a float or a 0-d tensor); the norm is computed in float32."""
    if not HAND_BACKWARD:  # the definition, differentiated by autograd
        dims = tuple(range(1, x.ndim)) if dim is None else (dim,)
        norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        return x * (gain / (eps + norm / math.sqrt(x.numel() / norm.numel()))).to(x.dtype)
    if dim is None:
        return _Normalize.apply(x.flatten(1), gain, eps).view_as(x)
    return _Normalize.apply(x.movedim(dim, -1), gain, eps).movedim(-1, dim)


def pixel_norm(x, dim=-1, eps=NORM_EPS):
    """Normalise each feature vector (over channels `dim`) to unit RMS."""
    return normalize(x, dim=dim, eps=eps)


SILU_RMS = 0.596  # E[silu(z)^2]^(1/2) for z ~ N(0, 1)


def mp_silu(x):
    """silu(x) / 0.596, where 0.596 = E[silu(z)^2]^(1/2) for z ~ N(0, 1)."""
    return F.silu(x) / SILU_RMS


class MPSiLU(nn.Module):
    """Module form of mp_silu, for use inside nn.Sequential."""

    def forward(self, x):
        return mp_silu(x)


def mp_sum(a, b, t=0.5):
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): a blend of two unit-variance tensors that keeps
    unit variance when they are uncorrelated. t = 0.3 for residual branches, 0.5 to join
    embeddings."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=-1, t=0.5):
    """Concatenate along `dim` with a's channels weighted (1 - t) and b's weighted t, scaled so the
    result has unit variance:  C = sqrt((Na + Nb) / ((1 - t)^2 + t^2)),
    out = [C (1 - t) / sqrt(Na) a, C t / sqrt(Nb) b]."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPLinear(nn.Module):
    """Bias-free linear layer with weight normalisation:  y = x W^T,  W = g normalize(V) / sqrt(fan_in).

    V starts N(0, 1). Unit-variance input gives unit-variance output (times the gain g).
    g is fixed at 1 unless `gain` is given, in which case it is a learned scalar initialised to
    `gain` (gain=0.0 makes the layer output zero at init). A constant `scale` multiplies the output
    for free (it is folded into W): MPLinear(scale=1 / SILU_RMS) of silu(x) is MPLinear of mp_silu(x)
    without a pass over x. With `patch_size` p the layer is a p x p convolution with stride p over
    (N, C, H, W) input (a patch embedding), fan_in = C p p.

    forced=True adds EDM2's forced weight normalisation: `force_normalize_(model)` resets the stored V to
    unit-RMS rows; the trainer calls it after every optimiser step (and it is called at init), so
    the effective learning rate stays constant. The forward pass never modifies V, so an EMA or
    evaluation copy can run in any mode without its weights being rewritten.

    Without autograd, a frozen layer (V and g with requires_grad False: an EMA copy, a model loaded
    for sampling) caches its effective weight per dtype and recomputes it only when V or g change
    in place (their version counters: EMA updates, load_state_dict). A layer that trains is never
    served from the cache: an optimiser need not bump version counters (fused Adam does not), so
    only a fresh W is sure to be current for the monitor or an evaluation of the live model. In training, an
    input with fewer rows than input features (the adaLN and timestep layers: one row per image)
    is multiplied by V itself and the outputs scaled (_RowScaledLinear), which skips forming W and
    its backward; token layers form W, which is then the smaller tensor. Both are exact.
    """

    def __init__(self, in_features, out_features, forced=False, gain=None, patch_size=None, scale=1.0):
        super().__init__()
        self.forced, self.patch_size, self.scale = forced, patch_size, scale
        kernel = () if patch_size is None else (patch_size, patch_size)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, *kernel))
        self.gain = None if gain is None else nn.Parameter(torch.tensor(float(gain)))
        self._cache = None
        if forced:
            force_normalize_(self)

    def effective_weight(self, dtype):
        gain = self.scale if self.gain is None else self.gain * self.scale
        v = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        return normalize(v, gain=gain / math.sqrt(self.weight[0].numel())).to(dtype)

    def cached_weight(self, dtype):
        key = (self.weight._version, None if self.gain is None else self.gain._version,
               self.weight.data_ptr(), dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.effective_weight(dtype))
        return self._cache[1]

    def forward(self, x):
        frozen = not (self.weight.requires_grad or (self.gain is not None and self.gain.requires_grad))
        if frozen and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            w = self.cached_weight(x.dtype)
        elif HAND_BACKWARD and self.patch_size is None and x.numel() < x.shape[-1] ** 2:  # fewer rows than features
            return _RowScaledLinear.apply(x, self.weight, self.gain, self.scale)
        else:
            w = self.effective_weight(x.dtype)
        if self.patch_size is None:
            return F.linear(x, w)
        return F.conv2d(x, w, stride=self.patch_size)

    def extra_repr(self):
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, patch_size={self.patch_size}, "
                f"forced={self.forced}, learned_gain={self.gain is not None}, scale={self.scale:.4g}")


class MPEmbedding(nn.Module):
    """Embedding table whose rows are normalised to unit RMS:  e(y) = normalize(E)[y].

    E starts N(0, 1); forced=True resets the stored rows to unit RMS after each optimiser step
    (see MPLinear)."""

    def __init__(self, num_embeddings, dim, forced=False):
        super().__init__()
        self.forced = forced
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim))
        if forced:
            force_normalize_(self)

    def forward(self, y):
        return pixel_norm(F.embedding(y, self.weight.float()))  # only the rows looked up


class MPFourier(nn.Module):
    """Random Fourier features  sqrt(2) cos(2 pi (f x + phi)),  f ~ N(0, bandwidth^2),  phi ~ U(0, 1).

    Unit RMS for any x. x must be O(1) (EDM2 feeds ln(sigma) / 4): on a raw integer timestep
    0..999 neighbouring steps get unrelated phases (aliasing), so callers scale t first.
    Input (N,), output (N, num_channels)."""

    def __init__(self, num_channels, bandwidth=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        return np.sqrt(2) * (x.float().unsqueeze(-1) * self.freqs + self.phases).cos()


def cosine_attention(q, k, v, normalize_v=False):
    """softmax(q' k'^T / sqrt(d)) v' with q', k' (and v' if normalize_v) at unit RMS per head.

    Shapes (N, heads, T, d). The logits are cosines scaled by sqrt(d), so they are bounded by
    sqrt(d) whatever the magnitude of the activations."""
    q, k = pixel_norm(q), pixel_norm(k)
    if normalize_v:
        v = pixel_norm(v)
    return F.scaled_dot_product_attention(q, k, v)


@torch.no_grad()
def force_normalize_(module):
    """Forced weight normalisation of every MP layer in `module` that has it switched on: each stored
    row is scaled in place to unit RMS, w <- w / (eps + ||w|| / sqrt(n))."""
    for m in module.modules():
        if isinstance(m, (MPLinear, MPEmbedding)) and m.forced:
            w = m.weight.flatten(1)
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float32)
            w.mul_((1 / (NORM_EPS + norm / math.sqrt(w.shape[1]))).to(w.dtype))


# Hand-written backward passes. Each is the formula of the primitive above it with its gradient
# written out, exact, and tested against plain autograd (tests/test_mp_layers.py). They make fewer
# passes over x and V than autograd does: on a CPU they lift MaP-DiT-S/2's train step from about
# 0.86x to 0.92x of vanilla DiT; HAND_BACKWARD = False gives the plain definitions (to time them
# on a GPU, or to read).

class _Normalize(torch.autograd.Function):
    """y = gain x / r over the last dim, r = eps + |x| / sqrt(n), with the backward written out:
        dx = (gain / r) dy - gain <dy, x> / (r^2 |x| sqrt(n)) x,   dgain = sum <dy, x> / r.
    Autograd of the same expression makes several more passes over x; for MaP-DiT-S/2 this
    lifts the train step from about 0.86x to 0.92x of vanilla DiT on a CPU."""

    @staticmethod
    def forward(ctx, x, gain, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        r = norm / math.sqrt(x.shape[-1]) + eps
        ctx.save_for_backward(x, norm, r, gain if torch.is_tensor(gain) else None)
        ctx.gain = gain
        return x * (gain / r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, norm, r, gain_tensor = ctx.saved_tensors
        gain = ctx.gain if gain_tensor is None else gain_tensor
        dot = torch.linalg.vecdot(dy.to(r.dtype), x.to(r.dtype)).unsqueeze(-1)
        coef = gain * dot / (r * r * norm.clamp_min(1e-30) * math.sqrt(x.shape[-1]))
        dx = (dy * (gain / r).to(dy.dtype)).addcmul_(x, coef.to(x.dtype), value=-1)
        dgain = (dot / r).sum() if gain_tensor is not None and ctx.needs_input_grad[1] else None
        return dx, dgain, None


class _RowScaledLinear(torch.autograd.Function):
    """MPLinear's training output without forming W: with c = g scale, u_i = 1 / (||V_i|| + eps sqrt(n)),
        z = x V^T,  y = z (c u),   and, with dz = dy (c u) and ds_i = sum over rows of dy_i z_i,
        dx = dz V,  dV = dz^T x - ds_i c u_i^2 / ||V_i|| V_i,  dg = scale sum_i ds_i u_i.
    Every pass over V is one read or one in-place update; the rest is the size of y. For inputs with
    fewer rows than features (one row per image), where this is cheaper than forming W."""

    @staticmethod
    def forward(ctx, x, v, gain, scale):
        norm = torch.linalg.vector_norm(v, dim=1, dtype=torch.promote_types(v.dtype, torch.float32))
        u = 1 / (norm + NORM_EPS * math.sqrt(v.shape[1]))
        c = scale if gain is None else gain * scale
        z = F.linear(x, v)
        ctx.save_for_backward(x, v, norm, u, z, gain)
        ctx.scale = scale
        return z * (c * u).to(z.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, v, norm, u, z, gain = ctx.saved_tensors
        c = ctx.scale if gain is None else gain * ctx.scale
        dtype = z.dtype  # the matmul's (bf16 under autocast)
        dz = dy.to(dtype) * (c * u).to(dtype)
        dx = (dz @ v.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        ds = (dy.to(u.dtype) * z.to(u.dtype)).flatten(0, -2).sum(0)
        dv = None
        if ctx.needs_input_grad[1]:
            dv = (dz.flatten(0, -2).T @ x.flatten(0, -2).to(dtype)).to(v.dtype)
            dv.addcmul_(v, (ds * c * u * u / norm.clamp_min(1e-30)).unsqueeze(1).to(v.dtype), value=-1)
        dgain = ctx.scale * (ds * u).sum() if gain is not None and ctx.needs_input_grad[2] else None
        return dx, dv, dgain, None
