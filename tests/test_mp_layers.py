"""Each MP primitive against its formula. Tolerances: with n independent samples the relative
standard error of an RMS estimate is about 1 / sqrt(2 n); 2% allows > 10 standard errors at the
sample sizes used here while still catching any wrong constant (the smallest error a wrong
formula would make, e.g. a missing 1/sqrt(fan_in), is far larger)."""
import math

import pytest
import torch
import torch.nn.functional as F

import mp_layers
from models import DiT_models
from mp_layers import (MPEmbedding, MPFourier, MPLinear, cosine_attention, force_normalize_, mp_cat, mp_silu,
                       mp_sum, normalize, pixel_norm)


def rms(x):
    return x.float().pow(2).mean().sqrt().item()


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_normalize_gives_unit_rms_rows():
    w = torch.randn(32, 7, 3, 3) * 5
    rows = normalize(w).flatten(1)
    assert torch.allclose(rows.pow(2).mean(1).sqrt(), torch.ones(32), atol=1e-3)
    assert torch.allclose(pixel_norm(w, dim=1).pow(2).mean(1), torch.ones(32, 3, 3), atol=1e-3)


def test_normalize_float32_norm_under_half_precision():
    w = torch.full((4, 4096), 300.0, dtype=torch.float16)  # sum of squares overflows fp16
    out = normalize(w)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.allclose(out.float(), torch.ones_like(out, dtype=torch.float32), atol=1e-2)


def test_mp_silu_unit_rms():
    assert rms(mp_silu(torch.randn(1_000_000))) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_formula_and_magnitude(t):
    a, b = torch.randn(1_000_000), torch.randn(1_000_000)
    assert rms(mp_sum(a, b, t)) == pytest.approx(1.0, rel=0.02)
    norm = math.sqrt((1 - t) ** 2 + t ** 2)
    assert mp_sum(torch.ones(1), torch.zeros(1), t).item() == pytest.approx((1 - t) / norm)
    assert mp_sum(torch.zeros(1), torch.ones(1), t).item() == pytest.approx(t / norm)


def test_mp_cat_weights_and_magnitude():
    t, na, nb = 0.3, 48, 16
    a, b = torch.randn(20000, na), torch.randn(20000, nb)
    out = mp_cat(a, b, dim=1, t=t)
    assert out.shape == (20000, na + nb)
    assert rms(out) == pytest.approx(1.0, rel=0.02)
    energy_a, energy_b = out[:, :na].pow(2).sum(1).mean(), out[:, na:].pow(2).sum(1).mean()
    assert (energy_b / energy_a).item() == pytest.approx(t ** 2 / (1 - t) ** 2, rel=0.03)


def test_mp_linear_preserves_magnitude_and_gain():
    layer = MPLinear(256, 384)
    x = torch.randn(4096, 256)
    assert rms(layer(x)) == pytest.approx(1.0, rel=0.02)
    assert rms(MPLinear(256, 384, gain=0.0)(x)) == 0.0
    assert rms(MPLinear(256, 384, gain=2.0)(x)) == pytest.approx(2.0, rel=0.02)


def test_mp_linear_patch_mode_equals_linear_on_patches():
    layer = MPLinear(5, 16, patch_size=2)
    x = torch.randn(3, 5, 8, 8)
    patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(3, 4, 4, 20)
    w = normalize(layer.weight.reshape(16, 20)) / math.sqrt(20)
    expected = (patches @ w.T).permute(0, 3, 1, 2)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert rms(layer(torch.randn(64, 5, 8, 8))) == pytest.approx(1.0, rel=0.03)


def test_forced_weight_normalization_after_a_step():
    layer = MPLinear(64, 32, forced=True)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(16, 64)).pow(2).sum().backward()
    opt.step()
    row_rms = layer.weight.pow(2).mean(1).sqrt()
    assert not torch.allclose(row_rms, torch.ones(32), atol=1e-3)  # the step moved them off the sphere
    force_normalize_(layer)
    assert torch.allclose(layer.weight.pow(2).mean(1).sqrt(), torch.ones(32), atol=1e-3)


def test_forward_never_rewrites_weights_in_any_mode():
    layer = MPLinear(64, 32, forced=True)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # an EMA-like copy whose rows are off the unit sphere
    before = layer.weight.clone()
    for mode in (True, False):
        layer.train(mode)
        layer(torch.randn(4, 64))
        with torch.no_grad():
            layer(torch.randn(4, 64))
    assert torch.equal(layer.weight, before)


def test_unforced_layer_is_left_alone_by_force_normalize():
    layer = MPLinear(8, 8)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    before = layer.weight.clone()
    force_normalize_(layer)
    assert torch.equal(layer.weight, before)


def test_inference_cache_tracks_weight_updates():
    """A frozen layer (an EMA copy, a model loaded for sampling) caches W and follows in-place edits."""
    layer = MPLinear(16, 8, gain=1.0).requires_grad_(False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = layer(x)
        assert layer.cached_weight(x.dtype) is layer._cache[1]  # served from the cache, not recomputed
        assert torch.equal(layer(x), first)
        layer.weight.add_(torch.randn_like(layer.weight))  # what an optimiser step does
        fresh = F.linear(x, normalize(layer.weight) / 4.0)
        assert torch.allclose(layer(x), fresh, atol=1e-6)
        layer.gain.fill_(0.5)
        assert torch.allclose(layer(x), 0.5 * fresh, atol=1e-6)


@pytest.mark.parametrize("update", ["fused", "foreach", "data"])
def test_no_grad_forward_of_a_training_layer_sees_every_step(update):
    """Fused Adam (train.py's choice on a GPU) and updates through .data leave the version counter
    of V unchanged: a no-grad forward of the live layer (the magnitude monitor, an evaluation) must
    still use the updated weights, not those of its first no-grad call."""
    layer = MPLinear(16, 8, gain=1.0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
    if update == "data":
        layer.weight.data.add_(torch.randn_like(layer.weight))
    else:
        opt = torch.optim.Adam(layer.parameters(), lr=0.1, **{update: True})
        layer(x).square().sum().backward()
        opt.step()
    with torch.no_grad():
        fresh = F.linear(x, normalize(layer.weight) * layer.gain / 4.0)
        assert torch.allclose(layer(x), fresh, atol=1e-6)


def test_mp_embedding_rows_unit_rms():
    emb = MPEmbedding(11, 64)
    out = emb(torch.arange(11))
    assert torch.allclose(out.pow(2).mean(1).sqrt(), torch.ones(11), atol=1e-3)
    labels = torch.tensor([[3, 3], [10, 0]])  # normalising the looked-up rows = looking up normalised rows
    torch.testing.assert_close(emb(labels), normalize(emb.weight.detach())[labels])


def test_mp_fourier_unit_rms_and_smooth_in_its_input():
    fourier = MPFourier(256)
    c = torch.linspace(-1, 1, 1000)
    feats = fourier(c)
    assert rms(feats) == pytest.approx(1.0, rel=0.05)
    neighbours = F.cosine_similarity(feats[:-1], feats[1:], dim=1)
    assert neighbours.min() > 0.99
    assert F.cosine_similarity(feats[:1], feats[-1:]).item() < 0.5


def test_cosine_attention_ignores_q_k_magnitude_and_matches_softmax():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    out = cosine_attention(q, k, v)
    assert torch.allclose(cosine_attention(5 * q, 0.5 * k, v), out, atol=1e-3)  # eps 1e-4 in the norm
    qn = q / (1e-4 + q.pow(2).mean(-1, keepdim=True).sqrt())
    kn = k / (1e-4 + k.pow(2).mean(-1, keepdim=True).sqrt())
    expected = torch.softmax(qn @ kn.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(cosine_attention(q, k, 7 * v, normalize_v=True), cosine_attention(q, k, v, normalize_v=True),
                          atol=1e-3)


def autograd_normalize(x, gain):
    """The same formula through plain autograd: the independent reference for the hand backward."""
    norm = x.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1))
    return gain * x / (1e-4 + norm / math.sqrt(x[0].numel()))


def test_normalize_backward_matches_autograd():
    x = torch.randn(6, 5, 2, dtype=torch.float64, requires_grad=True)
    gain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, g: normalize(a, gain=g), (x, gain))
    dy = torch.randn(6, 5, 2, dtype=torch.float64)
    grads = torch.autograd.grad((normalize(x, gain=gain) * dy).sum(), (x, gain))
    expected = torch.autograd.grad((autograd_normalize(x, gain) * dy).sum(), (x, gain))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
    xf = x.detach().float().requires_grad_()
    (normalize(xf, dim=-1) * dy.float()).sum().backward()  # a constant gain and another dim
    assert torch.isfinite(xf.grad).all()


@pytest.mark.parametrize("rows", [4, 128])  # fewer, then more rows than the 64 input features
def test_mp_linear_training_output_and_grads_match_formula(rows):
    """Training takes one of two exact routes (scaling the outputs, or forming W, by the number of
    input rows); both must give the output and all gradients of y = x (g normalize(V) / sqrt(fan_in))^T."""
    layer = MPLinear(64, 32, gain=0.7).double()
    with torch.no_grad():
        layer.weight.mul_(3 * torch.rand(32, 1, dtype=torch.float64))  # rows off the unit sphere
    x = torch.randn(rows, 64, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(rows, 32, dtype=torch.float64)
    out = layer(x)
    grads = torch.autograd.grad((out * dy).sum(), (x, layer.weight, layer.gain))
    v, g = layer.weight.detach().requires_grad_(), layer.gain.detach().requires_grad_()
    expected = F.linear(x, autograd_normalize(v, g) / 8)
    expected_grads = torch.autograd.grad((expected * dy).sum(), (x, v, g))
    torch.testing.assert_close(out, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    layer.requires_grad_(False)  # a frozen layer still passes gradients to its input
    torch.testing.assert_close(torch.autograd.grad((layer(x) * dy).sum(), x)[0], expected_grads[0])


@pytest.mark.parametrize("rows", [4, 128])
def test_mp_linear_trains_under_bf16_autocast(rows):
    """Both training routes under bf16 autocast: a bf16 output, float32 gradients, and the float32
    gradients to within bf16 rounding (8 bits of mantissa: 2% of the largest entry)."""
    layer = MPLinear(64, 32, gain=0.7)
    x, dy = torch.randn(rows, 64, requires_grad=True), torch.randn(rows, 32)
    expected = torch.autograd.grad((layer(x) * dy).sum(), (x, layer.weight, layer.gain))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    grads = torch.autograd.grad((out.float() * dy).sum(), (x, layer.weight, layer.gain))
    assert out.dtype == torch.bfloat16
    for a, b in zip(grads, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0.02 * b.abs().max().item())


def test_hand_backward_equals_the_plain_definitions(monkeypatch):
    """HAND_BACKWARD only changes how gradients are computed: a MaP-DiT's loss and every gradient are the
    same through the hand-written passes and through autograd of the plain definitions, to float32
    rounding (the two sum in different orders: 1e-4 relative is some 1000 ulps, and a wrong term in a
    hand-written gradient is off by far more)."""
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=4, num_classes=3, depth=2, hidden_size=64,
                                   num_heads=2, mp=True)
    for p in model.parameters():  # every learned gain away from its zero init, so every path matters
        p.data.add_(0.1 * torch.randn_like(p))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 1, 2])

    def loss_and_grads():
        torch.manual_seed(1)  # the same label dropout both times
        loss = model(x, t, y).pow(2).mean()
        return [loss, *torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]

    hand = loss_and_grads()
    monkeypatch.setattr(mp_layers, "HAND_BACKWARD", False)
    plain = loss_and_grads()
    for a, b in zip(hand, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
