import io

import pytest
import torch

from models import MODULATIONS, DiT, DiT_models, rotate_pairs
from mp_layers import mp_sum

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
ROTATIONS = ("rotation", "rotation-scale")
K = {"adaln": 6, "rotation": 3, "rotation-scale": 5}  # conditioning outputs per block, in units of D


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def inputs(n=3):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def rotation_matrix(theta):
    """Block-diagonal (D, D) matrix of the 2 x 2 rotations [[cos, -sin], [sin, cos]], theta (D/2,)."""
    return torch.block_diag(*[torch.stack([torch.stack([a.cos(), -a.sin()]), torch.stack([a.sin(), a.cos()])])
                              for a in theta])


def test_zero_angles_are_the_identity():
    x = torch.randn(2, 5, 64)
    assert torch.equal(rotate_pairs(x, torch.zeros(2, 32)), x)


def test_rotation_matches_the_2x2_matrices_and_keeps_every_token_norm():
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    theta = 10 * torch.randn(3, 8, dtype=torch.float64)
    out = rotate_pairs(x, theta)
    expected = torch.stack([x[i] @ rotation_matrix(theta[i]).T for i in range(3)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=0, atol=1e-12)
    # pair (0, 1) of sample 0 by hand
    c, s = theta[0, 0].cos(), theta[0, 0].sin()
    torch.testing.assert_close(out[0, :, 0], x[0, :, 0] * c - x[0, :, 1] * s, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, :, 1], x[0, :, 0] * s + x[0, :, 1] * c, rtol=0, atol=1e-12)


def test_rotation_keeps_norms_in_float32_under_bf16_autocast_and_compiles():
    x, theta = torch.randn(2, 9, 64), 5 * torch.randn(2, 32)
    torch.testing.assert_close(rotate_pairs(x, theta).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rotate_pairs(x.bfloat16(), theta.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rotate_pairs(x.bfloat16().float(), theta.bfloat16().float()),
                               rtol=2e-2, atol=2e-2)
    compiled = torch.compile(rotate_pairs, fullgraph=True, backend="eager")  # no graph breaks
    torch.testing.assert_close(compiled(x, theta), rotate_pairs(x, theta))


@pytest.mark.parametrize("modulation", K)
@pytest.mark.parametrize("mp", [False, True])
def test_model_runs_under_bf16_autocast(modulation, mp):
    model = DiT(**TINY, mp=mp, modulation=modulation)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*inputs())
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_odd_widths_and_unknown_options_are_errors():
    with pytest.raises(ValueError, match="even"):
        rotate_pairs(torch.randn(1, 2, 5), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="even"):
        DiT(**{**TINY, "hidden_size": 63, "num_heads": 3}, modulation="rotation")
    with pytest.raises(ValueError, match="adaln.*rotation.*rotation-scale"):
        DiT(**TINY, modulation="rotate")
    assert set(MODULATIONS) == set(K)


@pytest.mark.parametrize("modulation", ROTATIONS)
@pytest.mark.parametrize("mp", [False, True])
def test_blocks_see_the_unmodulated_input_at_init(modulation, mp):
    model = DiT(**TINY, mp=mp, modulation=modulation)
    assert model.modulation == modulation and all(b.modulation == modulation for b in model.blocks)
    seen = []
    for block in model.blocks:
        for branch in (block.attn, block.mlp):
            branch.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    with torch.no_grad():
        out = block(x, c)
        # by hand: no modulation, residual with gate 0 (vanilla) or 1 + gate = 1 (MP residual)
        h = mp_sum(x, block.attn(block.norm1(x)), t=0.3) if mp else x
        expected = mp_sum(h, block.mlp(block.norm2(h)), t=0.3) if mp else x
    # the MP residual is computed as an addcmul, mp_sum as a lerp: equal up to float rounding
    assert torch.equal(seen[0], block.norm1(x)) and torch.allclose(seen[1], block.norm2(h), atol=1e-6)
    assert torch.allclose(out, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs())).all()


@pytest.mark.parametrize("modulation", ROTATIONS)
@pytest.mark.parametrize("mp", [False, True])
def test_model_at_init_equals_adaln_model_with_the_same_other_weights(modulation, mp):
    """Zero-initialised conditioning linears: both models apply no modulation, only the (random) rest."""
    adaln = DiT(**TINY, mp=mp)
    with torch.no_grad():
        for name, p in adaln.named_parameters():
            if not (name.startswith("blocks.") and ".adaLN_modulation." in name):
                p.add_(0.3 * torch.randn_like(p))
    rotation = DiT(**TINY, mp=mp, modulation=modulation)
    shared = {k: v for k, v in adaln.state_dict().items() if ".adaLN_modulation." not in k or k.startswith("final")}
    missing, unexpected = rotation.load_state_dict(shared, strict=False)
    assert not unexpected and all(".adaLN_modulation." in k for k in missing)
    x, t, y = inputs()
    with torch.no_grad():
        expected = adaln.eval()(x, t, y)
        assert expected.abs().mean() > 0.01
        torch.testing.assert_close(rotation.eval()(x, t, y), expected)


@pytest.mark.parametrize("modulation", ROTATIONS)
def test_gradients_reach_the_angle_weights(modulation):
    """Vanilla: with the gates and the final linear trained away from 0 (zero-initialised, they
    block every gradient at step 0, as in DiT), the angle rows get gradients while still 0."""
    model = DiT(**TINY, modulation=modulation)
    d, half = 64, K[modulation] * 64 // 2
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.1)
        for block in model.blocks:
            gate_rows = [slice(half - d, half), slice(2 * half - d, 2 * half)]
            for rows in gate_rows:
                block.adaLN_modulation[1].weight[rows].normal_(std=0.1)
    model(*inputs()).square().mean().backward()
    for block in model.blocks:
        lin = block.adaLN_modulation[1]
        for rows in (slice(0, d // 2), slice(half, half + d // 2)):  # attention angles, MLP angles
            assert torch.count_nonzero(lin.weight[rows]) == 0
            assert lin.weight.grad[rows].abs().sum(1).min() > 0 and lin.bias.grad[rows].abs().min() > 0


@pytest.mark.parametrize("modulation", ROTATIONS)
def test_gradients_reach_the_learned_gain_of_the_mp_angle_linear(modulation):
    model = DiT(**TINY, mp=True, modulation=modulation)
    with torch.no_grad():
        model.final_layer.linear.gain.fill_(1.0)  # zero-initialised output gain: no gradient upstream at step 0
    model(*inputs()).square().mean().backward()
    for block in model.blocks:
        lin = block.adaLN_modulation[1]
        assert lin.gain.item() == 0 and lin.gain.grad.abs() > 0


def test_parameter_counts_by_hand():
    D, depth, C, p, classes, tokens = 64, 2, 4, 2, 10, 16
    for modulation, k in K.items():
        vanilla = (C * p * p * D + D                          # patch embedding (conv with bias)
                   + 256 * D + D + D * D + D                  # timestep MLP
                   + (classes + 1) * D + tokens * D           # label table, fixed position embedding
                   + depth * (D * 3 * D + 3 * D + D * D + D   # qkv, proj
                              + D * 4 * D + 4 * D + 4 * D * D + D  # fc1, fc2
                              + D * k * D + k * D)            # conditioning linear: k D outputs
                   + D * p * p * 2 * C + p * p * 2 * C        # final linear
                   + D * 2 * D + 2 * D)                       # final adaLN
        mp = ((C + 1) * p * p * D                             # patch embedding with the ones channel
              + 256 * D + D * D + (classes + 1) * D + tokens * D
              + depth * (3 * D * D + D * D + 4 * D * D + 4 * D * D + k * D * D + 1)  # + learned gain
              + D * p * p * 2 * C + 1 + 2 * D * D + 1)
        assert num_params(DiT(**TINY, modulation=modulation)) == vanilla
        assert num_params(DiT(**TINY, mp=True, modulation=modulation)) == mp


@pytest.mark.parametrize("mp, saving", [(False, 12 * (384 ** 2 + 384)), (True, 12 * 384 ** 2)])
def test_rotation_scale_saves_one_d_squared_per_block_on_s2(mp, saving):
    counts = {}
    for modulation in K:
        with torch.device("meta"):
            counts[modulation] = num_params(DiT_models["DiT-S/2"](input_size=16, mp=mp, modulation=modulation))
    assert counts["adaln"] - counts["rotation-scale"] == saving  # 1,774,080 vanilla, 1,769,472 MP
    assert counts["adaln"] - counts["rotation"] == 3 * saving
    if not mp:
        assert counts["adaln"] == 32_889_632
        assert round(100 * saving / counts["adaln"], 1) == 5.4


@pytest.mark.parametrize("modulation", ROTATIONS)
def test_mp_rotation_trains_and_its_state_dict_round_trips(modulation):
    model = DiT(**TINY, mp=True, modulation=modulation)
    x, t, y = inputs()
    out = model(x, t, y)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (K[modulation] * 64, 64)
    copy = DiT(**TINY, mp=True, modulation=modulation)
    copy.load_state_dict(state)
    model.eval(), copy.eval()
    with torch.no_grad():
        assert torch.equal(copy(x, t, y), model(x, t, y))
    with pytest.raises(RuntimeError, match="size mismatch"):
        DiT(**TINY, mp=True).load_state_dict(state)
