"""DiT (Peebles & Xie 2023) with every magnitude-preserving (MP) feature of MaP-DiT as a switch.

All switches off gives the original DiT, parameter for parameter: the state-dict keys and shapes
match the official checkpoints. `mp=True` turns every switch in MP_SWITCHES on (MaP-DiT).
`modulation` picks how the blocks are conditioned (MODULATIONS; default "adaln", DiT's own).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mp_layers import SILU_RMS, MPEmbedding, MPFourier, MPLinear, MPSiLU, cosine_attention, mp_sum, normalize

MP_SWITCHES = {
    "use_cosine_attention": "q, k normalised per head (and the output, with the MP residual)",
    "use_weight_normalization": "every linear becomes MPLinear: no bias, normalised weights; "
                                "zero-initialised layers get a learned gain initialised to 0",
    "use_forced_weight_normalization": "stored weights reset to unit-RMS rows after each optimiser step",
    "use_mp_residual": "x = mp_sum(x, (1 + gate) branch, 0.3) instead of x + gate branch",
    "use_mp_silu": "every SiLU / GELU becomes mp_silu = silu / 0.596",
    "use_no_layernorm": "no LayerNorm before attention, MLP and the final layer",
    "use_mp_pos_enc": "unit-RMS sin-cos position embedding joined by mp_sum",
    "use_mp_embedding": "MP Fourier timestep features of 2t/t_max - 1, unit-RMS label embeddings, joined by mp_sum",
}


MODULATIONS = {  # how each block's conditioning c acts on the inputs of attention and MLP
    "adaln": "DiT's adaLN-Zero: x (1 + scale) + shift, then x + gate branch; 6D conditioning outputs per block",
    "rotation": "channel pairs (2i, 2i+1) rotated by learned angles theta_i(c), identity at init; "
                "3D outputs per block",
    "rotation-scale": "rotation, then x (1 + scale); 5D outputs per block (no shift)",
}


class Switches:
    """The MP switches of one model, with their consistency rules."""

    def __init__(self, mp=False, **flags):
        unknown = set(flags) - set(MP_SWITCHES)
        if unknown:
            raise TypeError(f"unknown MP switch(es): {sorted(unknown)}; known: {list(MP_SWITCHES)}")
        for name in MP_SWITCHES:
            setattr(self, name, mp or bool(flags.get(name, False)))
        if self.use_forced_weight_normalization and not self.use_weight_normalization:
            raise ValueError("use_forced_weight_normalization needs use_weight_normalization: forced "
                             "normalisation alone leaves rows at norm sqrt(fan_in) and activations explode")

    def as_dict(self):
        return {name: getattr(self, name) for name in MP_SWITCHES}


def linear(in_features, out_features, sw, zero_init=False):
    """nn.Linear (vanilla) or MPLinear (weight normalisation); zero_init layers start at output 0."""
    if sw.use_weight_normalization:
        return MPLinear(in_features, out_features, forced=sw.use_forced_weight_normalization,
                        gain=0.0 if zero_init else None)
    return nn.Linear(in_features, out_features)


def activation(sw, vanilla):
    return MPSiLU() if sw.use_mp_silu else vanilla


def layer_norm(dim, sw):
    return nn.Identity() if sw.use_no_layernorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


MP_RESIDUAL_T = 0.3  # mp_sum's blend for residual branches (EDM2)
MP_RESIDUAL_SKIP = (1 - MP_RESIDUAL_T) / math.sqrt((1 - MP_RESIDUAL_T) ** 2 + MP_RESIDUAL_T ** 2)
MP_RESIDUAL_BRANCH = MP_RESIDUAL_T / math.sqrt((1 - MP_RESIDUAL_T) ** 2 + MP_RESIDUAL_T ** 2)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rotate_pairs(x, theta):
    """Rotate channel pairs: (x_2i, x_2i+1) -> (x_2i cos th_i - x_2i+1 sin th_i, x_2i sin th_i + x_2i+1 cos th_i).

    x (N, T, D) with D even, theta (N, D/2): one rotation per sample, shared by its tokens, so
    every token keeps its norm. cos and sin are taken in (at least) float32, the product in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"rotate_pairs needs an even number of channels, got {x.shape[-1]}")
    theta = theta.to(torch.promote_types(theta.dtype, torch.float32)).unsqueeze(1)
    cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) (W / p). The MP version appends a constant-ones
    channel (standing in for the bias) and uses a weight-normalised p x p convolution."""

    def __init__(self, patch_size, in_channels, hidden_size, sw):
        super().__init__()
        self.mp = sw.use_weight_normalization
        if self.mp:
            self.proj = MPLinear(in_channels + 1, hidden_size, forced=sw.use_forced_weight_normalization,
                                 patch_size=patch_size)
        else:
            self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if self.mp:
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # contiguous tokens: faster downstream


def timestep_embedding(t, dim, max_period=10000):
    """DiT's sinusoidal features of the timestep t (N,): [cos(t f), sin(t f)], f = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): features of t, then linear, activation, linear.

    t lies in [0, t_max]: DDPM's integer timesteps (t_max 1000) or a flow's time in [0, 1] (t_max 1).
    Vanilla: DiT's sinusoid of the raw t (for a flow, SiT's: t in [0, 1] as it is). MP: Fourier
    features of c = 2 t / t_max - 1 in [-1, 1] for either; the raw integer would alias
    (neighbouring steps unrelated)."""

    def __init__(self, hidden_size, sw, frequency_embedding_size=256, t_max=1000):
        super().__init__()
        self.t_max = t_max
        self.fourier = MPFourier(frequency_embedding_size) if sw.use_mp_embedding else None
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            linear(frequency_embedding_size, hidden_size, sw),
            activation(sw, nn.SiLU()),
            linear(hidden_size, hidden_size, sw),
        )

    def forward(self, t):
        if self.fourier is not None:
            features = self.fourier(2 * t.float() / self.t_max - 1)
        else:
            features = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features)


class LabelEmbedder(nn.Module):
    """y (N,) -> (N, D). Row num_classes is the null class; in training each label is replaced by
    it with probability dropout_prob (classifier-free guidance dropout)."""

    def __init__(self, num_classes, hidden_size, dropout_prob, sw):
        super().__init__()
        if sw.use_mp_embedding:
            self.embedding_table = MPEmbedding(num_classes + 1, hidden_size,
                                               forced=sw.use_forced_weight_normalization)
        else:
            self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with scaled_dot_product_attention. Cosine attention normalises
    q and k per head; with the MP residual it also normalises the output per head, since a softmax
    average of unit vectors shrinks with the number of tokens it spreads over (without this the
    stream of MaP-DiT-S/2 decays to 0.77 RMS by block 12 at init). That makes normalising v redundant."""

    def __init__(self, dim, num_heads, sw):
        super().__init__()
        self.num_heads = num_heads
        self.cosine = sw.use_cosine_attention
        self.mp_output = sw.use_cosine_attention and sw.use_mp_residual
        self.qkv = linear(dim, 3 * dim, sw)
        self.proj = linear(dim, dim, sw)

    def forward(self, x):
        N, T, C = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.cosine:
            x = cosine_attention(q, k, v)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        if self.mp_output:
            x = normalize(x, dim=-1)
        return self.proj(x.transpose(1, 2).reshape(N, T, C))


class Mlp(nn.Module):
    """fc2(act(fc1(x))). With MP-SiLU and weight normalisation, mp_silu(h) W^T = silu(h) (W / 0.596)^T:
    the division is folded into fc2's weight, which saves a pass over the 4D-wide hidden activations."""

    def __init__(self, dim, hidden_dim, sw):
        super().__init__()
        fold = sw.use_mp_silu and sw.use_weight_normalization
        self.fc1 = linear(dim, hidden_dim, sw)
        self.act = nn.SiLU() if fold else activation(sw, nn.GELU(approximate="tanh"))
        self.fc2 = (MPLinear(hidden_dim, dim, forced=sw.use_forced_weight_normalization, scale=1 / SILU_RMS)
                    if fold else linear(hidden_dim, dim, sw))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate * f(modulate(norm(x), shift, scale)) for f = attention, MLP.
    With the MP residual: mp_sum(x, (1 + gate) f(...), 0.3), so the stream keeps unit RMS at
    init (a zero gate inside mp_sum would shrink it by 0.92 per sub-block).

    Rotation modulation replaces modulate(h, shift, scale) by rotate_pairs(h, theta), times
    (1 + scale) for "rotation-scale". The conditioning linear (named adaLN_modulation for every
    option) outputs, for attention then MLP: [shift, scale, gate] (D each), [theta (D/2), gate] or
    [theta, scale, gate]. It is zero-initialised, so at init the rotation is the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, sw, modulation="adaln"):
        super().__init__()
        self.mp_residual = sw.use_mp_residual
        self.modulation = modulation
        d = hidden_size
        self.sizes = {"adaln": [d, d, d], "rotation": [d // 2, d], "rotation-scale": [d // 2, d, d]}[modulation]
        self.norm1 = layer_norm(hidden_size, sw)
        self.attn = Attention(hidden_size, num_heads, sw)
        self.norm2 = layer_norm(hidden_size, sw)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), sw)
        self.adaLN_modulation = nn.Sequential(activation(sw, nn.SiLU()),
                                              linear(hidden_size, 2 * sum(self.sizes), sw, zero_init=True))

    def branch_input(self, h, params):
        """(input of the branch, gate) from h (N, T, D) and the branch's conditioning outputs params."""
        if self.modulation == "adaln":
            shift, scale, gate = params.split(self.sizes, dim=1)
            return modulate(h, shift, scale), gate
        if self.modulation == "rotation":
            theta, gate = params.split(self.sizes, dim=1)
            return rotate_pairs(h, theta), gate
        theta, scale, gate = params.split(self.sizes, dim=1)
        return rotate_pairs(h, theta) * (1 + scale.unsqueeze(1)), gate

    def residual(self, x, gate, branch):
        if self.mp_residual:  # mp_sum(x, (1 + gate) branch, 0.3), as one multiply and one addcmul
            return torch.addcmul(x * MP_RESIDUAL_SKIP, branch, (1 + gate.unsqueeze(1)) * MP_RESIDUAL_BRANCH)
        return x + gate.unsqueeze(1) * branch

    def forward(self, x, c):
        params_msa, params_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        h, gate = self.branch_input(self.norm1(x), params_msa)
        x = self.residual(x, gate, self.attn(h))
        h, gate = self.branch_input(self.norm2(x), params_mlp)
        return self.residual(x, gate, self.mlp(h))


class FinalLayer(nn.Module):
    """linear(modulate(norm(x), shift, scale)): adaLN shift and scale whatever the blocks' modulation."""

    def __init__(self, hidden_size, patch_size, out_channels, sw):
        super().__init__()
        self.norm_final = layer_norm(hidden_size, sw)
        self.linear = linear(hidden_size, patch_size * patch_size * out_channels, sw, zero_init=True)
        self.adaLN_modulation = nn.Sequential(activation(sw, nn.SiLU()),
                                              linear(hidden_size, 2 * hidden_size, sw, zero_init=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone. forward(x (N, C, H, W), t (N,), y (N,)) ->
    (N, 2C, H, W) with learned sigma (eps, then the variance interpolation v), else (N, C, H, W).
    `modulation` (one of MODULATIONS) conditions the blocks; the final layer always uses adaLN.
    t_max: t lies in [0, t_max], 1000 for DDPM's timesteps, 1 for a flow's time (TimestepEmbedder)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        mp=False,
        modulation="adaln",
        t_max=1000,
        **switches,
    ):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"unknown modulation {modulation!r}; choose one of {list(MODULATIONS)}")
        if modulation != "adaln" and hidden_size % 2:
            raise ValueError(f"{modulation} modulation rotates channel pairs: hidden_size must be even, "
                             f"got {hidden_size}")
        self.switches = sw = Switches(mp, **switches)
        self.modulation = modulation
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.input_size = input_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, sw)
        self.t_embedder = TimestepEmbedder(hidden_size, sw, t_max=t_max)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, sw)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, sw, modulation)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, sw)
        self.grad_checkpoint = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation for the vanilla layers; MP layers keep their N(0, 1) weights."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], int(self.pos_embed.shape[1] ** 0.5))
        pos_embed = torch.from_numpy(pos_embed).float()
        if self.switches.use_mp_pos_enc:
            pos_embed = normalize(pos_embed, dim=-1)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))

        if isinstance(self.x_embedder.proj, nn.Conv2d):
            w = self.x_embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(self.x_embedder.proj.bias, 0)
        if isinstance(self.y_embedder.embedding_table, nn.Embedding):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)

        zero_init = [block.adaLN_modulation[-1] for block in self.blocks]
        zero_init += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero_init:
            if isinstance(layer, nn.Linear):
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)

    def unpatchify(self, x):
        """(N, T, p * p * C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Tokens (N, T, D) and conditioning (N, D)."""
        x = self.x_embedder(x)
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training, force_drop_ids)
        if self.switches.use_mp_pos_enc:
            x = mp_sum(x, self.pos_embed.to(x.dtype), t=0.5)
        else:
            x = x + self.pos_embed
        if self.switches.use_mp_embedding:  # float32: under autocast t is bf16, the label table float32
            c = mp_sum(t.float(), y.float(), t=0.5)
        else:
            c = t + y
        return x, c

    def forward(self, x, t, y, force_drop_ids=None):
        """force_drop_ids (N,): 1 where the label is replaced by the null class, instead of the
        random classifier-free-guidance dropout of training mode."""
        x, c = self.embed(x, t, y, force_drop_ids)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size * grid_size, embed_dim) MAE-style 2-D sin-cos embedding."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

MODEL_SIZES = {  # depth, hidden size, heads
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "XS": (6, 256, 4),
}


def _config(size, patch_size):
    depth, hidden_size, num_heads = MODEL_SIZES[size]

    def build(**kwargs):
        """DiT-{size}/{patch}; keyword arguments (including depth, hidden_size, num_heads) override."""
        config = dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
        return DiT(**{**config, **kwargs})
    build.__name__ = f"DiT_{size}_{patch_size}"
    return build


DiT_models = {f"DiT-{size}/{p}": _config(size, p) for size in MODEL_SIZES for p in (2, 4, 8)}
