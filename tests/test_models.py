import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MP_SWITCHES, DiT, DiT_models, Mlp, Switches
from mp_layers import MPEmbedding, MPLinear, force_normalize_, mp_silu

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def count(name, input_size):
    with torch.device("meta"):
        model = DiT_models[name](input_size=input_size)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, input_size, expected", [
    ("DiT-S/2", 16, 32_889_632),
    ("DiT-B/2", 16, 130_364_960),
    ("DiT-XL/2", 32, 675_129_632),
    ("DiT-S/2", 32, 32_963_360),
    ("DiT-L/2", 16, 457_906_208),
])
def test_vanilla_parameter_counts_match_dit(name, input_size, expected):
    assert count(name, input_size) == expected


def test_zoo_has_fifteen_models():
    assert sorted(DiT_models) == sorted(f"DiT-{s}/{p}" for s in ("XS", "S", "B", "L", "XL") for p in (2, 4, 8))


OFFICIAL_XL2_SHAPES = {  # from the official DiT-XL-2-256x256.pt, as listed in REFERENCE.md
    "pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152), "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152), "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152), "final_layer.adaLN_modulation.1.bias": (2304,),
}
for _i in range(28):
    OFFICIAL_XL2_SHAPES.update({
        f"blocks.{_i}.attn.qkv.weight": (3456, 1152), f"blocks.{_i}.attn.qkv.bias": (3456,),
        f"blocks.{_i}.attn.proj.weight": (1152, 1152), f"blocks.{_i}.attn.proj.bias": (1152,),
        f"blocks.{_i}.mlp.fc1.weight": (4608, 1152), f"blocks.{_i}.mlp.fc1.bias": (4608,),
        f"blocks.{_i}.mlp.fc2.weight": (1152, 4608), f"blocks.{_i}.mlp.fc2.bias": (1152,),
        f"blocks.{_i}.adaLN_modulation.1.weight": (6912, 1152), f"blocks.{_i}.adaLN_modulation.1.bias": (6912,),
    })


def test_vanilla_state_dict_matches_official_checkpoint_layout():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == OFFICIAL_XL2_SHAPES


def reference_dit_forward(sd, x, t, y, patch=2, heads=4):
    """DiT's forward written from the paper's description, straight from a state dict."""
    def lin(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    n, tokens, d = h.shape
    for i in range(sum(1 for k in sd if k.endswith("attn.qkv.weight"))):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1")[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        a = ln(h) * (1 + sc1) + sh1
        q, k, v = lin(a, b + "attn.qkv").reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(n, tokens, d), b + "attn.proj")
        m = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    out = lin(ln(h) * (1 + scale) + shift, "final_layer.linear")
    side = int(tokens ** 0.5)
    out = out.reshape(n, side, side, patch, patch, -1).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, -1, side * patch, side * patch)


def test_vanilla_forward_equals_reference_dit_on_random_weights():
    model = DiT(**TINY).eval()
    sd = {k: torch.randn_like(v) * 0.3 if k != "pos_embed" else v for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), reference_dit_forward(sd, x, t.float(), y), atol=1e-4)


def test_mp_preset_keeps_unit_rms_through_every_block():
    model = DiT_models["DiT-S/2"](input_size=16, mp=True).eval()
    x, t, y = torch.randn(4, 4, 16, 16), torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))
    stream = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, out: stream.append(out.pow(2).mean().sqrt().item()))
    with torch.no_grad():
        out = model(x, t, y)
    assert len(stream) == 12
    assert all(0.8 <= r <= 1.25 for r in stream), stream
    assert torch.count_nonzero(out) == 0  # zero-initialised output gain


def test_mp_preset_turns_every_switch_on():
    model = DiT(**TINY, mp=True)
    assert all(model.switches.as_dict().values())
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)) for m in model.modules())


@pytest.mark.parametrize("switch", MP_SWITCHES)
def test_each_switch_alone_trains(switch):
    flags = {switch: True}
    if switch == "use_forced_weight_normalization":
        flags["use_weight_normalization"] = True
    model = DiT(**TINY, **flags)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_forced_without_weight_normalization_is_an_error():
    with pytest.raises(ValueError, match="use_weight_normalization"):
        DiT(**TINY, use_forced_weight_normalization=True)
    with pytest.raises(TypeError, match="unknown MP switch"):
        DiT(**TINY, use_cosine_attn=True)


def test_forced_normalization_keeps_every_stored_row_unit_rms_after_a_step():
    model = DiT(**TINY, mp=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    model(x, t, y).square().mean().backward()
    opt.step()
    force_normalize_(model)
    layers = [m for m in model.modules() if isinstance(m, (MPLinear, MPEmbedding))]
    assert len(layers) == 1 + 2 + 1 + 2 * 5 + 2  # patch, t-MLP, labels, 5 per block, final layer
    for m in layers:
        rows = m.weight.flatten(1).pow(2).mean(1).sqrt()
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-3)


def test_timestep_features_do_not_alias():
    model = DiT(**TINY, mp=True)
    emb = model.t_embedder.fourier(2 * torch.arange(1000.0) / 1000 - 1)
    assert F.cosine_similarity(emb[:-1], emb[1:]).min() > 0.99


def test_gradient_checkpointing_gives_the_same_gradients():
    model = DiT(**TINY, mp=True)
    for p in model.parameters():
        p.data.normal_()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([0, 9])
    grads = []
    for flag in (False, True):
        model.grad_checkpoint = flag
        model.zero_grad()
        model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long)).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_mp_residual_is_mp_sum_with_the_gate_on_the_branch():
    from mp_layers import mp_sum
    block = DiT(**TINY, mp=True).blocks[0]
    x, branch, gate = torch.randn(2, 16, 64), torch.randn(2, 16, 64), torch.randn(2, 64)
    torch.testing.assert_close(block.residual(x, gate, branch), mp_sum(x, (1 + gate[:, None]) * branch, 0.3))


def test_mlp_folds_mp_silu_into_fc2():
    """MaP's MLP runs silu and scales fc2's weight by 1 / 0.596 instead of dividing the hidden activations:
    the output and input gradient equal fc2(mp_silu(fc1(x))) with an unscaled fc2 of the same weights."""
    mlp = Mlp(64, 256, Switches(mp=True))
    plain = MPLinear(256, 64, forced=True)
    plain.weight.data.copy_(mlp.fc2.weight)
    x = torch.randn(8, 32, 64, requires_grad=True)
    out = mlp(x)
    want = plain(mp_silu(mlp.fc1(x)))
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, g)[0] for y in (out, want)))
    assert isinstance(mlp.act, nn.SiLU) and 0.8 < out.std().item() < 1.2  # unit RMS, as MP layers promise
