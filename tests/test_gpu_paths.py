"""The paths train.py takes only on a GPU, run on the CPU (torch has fused Adam, bf16 autocast and
torch.compile there too), so that the first GPU the code meets finds them working: fused against
foreach Adam, bf16 autocast training with the MP norms in float32, and the compiled loss against
eager. Tiny models: DiT at depth 2, width 64, 8x8x4 inputs (16 tokens)."""
import pytest
import torch

import mp_layers
from diffusion import create_diffusion
from models import DiT
from mp_layers import force_normalize_

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def batch(n=8, seed=0):
    """(x0, t, model_kwargs, noise): one fixed training batch, half of the labels dropped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g).cumsum(-1) / 3
    t = torch.randint(0, 1000, (n,), generator=g)
    kwargs = dict(y=torch.randint(0, 10, (n,), generator=g), force_drop_ids=torch.arange(n) % 2)
    return x, t, kwargs, torch.randn(n, 4, 8, 8, generator=g)


def optimizer(model, mp, **kernel):
    """train.py's optimiser: Adam (0.9, 0.99) at 1e-2 with weight normalisation, else AdamW at 1e-4."""
    if mp:
        return torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), **kernel)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, **kernel)


def train_steps(model, opt, steps, autocast=None):
    """`steps` optimiser steps as train.py takes them (loss, backward, step, forced normalisation)
    on batches 0, 1, ...; returns the losses."""
    diffusion, losses = create_diffusion(""), []
    for i in range(steps):
        x, t, kwargs, noise = batch(seed=i)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
            loss = diffusion.training_losses(model, x, t, kwargs, noise=noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        force_normalize_(model)
        losses.append(loss.detach())
    return torch.stack(losses)


CONFIGS = {"vanilla": {}, "MaP": dict(mp=True), "weight norm, not forced": dict(use_weight_normalization=True)}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_adam_gives_the_weights_of_foreach_adam(config):
    """train.py uses fused Adam on a GPU and foreach Adam on a CPU: five steps of each from the same
    weights agree to float32 rounding (they only order the arithmetic differently; 1e-5 relative is
    100x float32's eps, far below the 1e-2 or 1e-4 a step moves a weight). The live model's no-grad
    forward (the magnitude monitor) then sees the stepped weights: fused Adam leaves the parameters'
    version counters alone, and without forced normalisation (whose in-place rescale bumps them)
    MPLinear once served the weights cached at the first call."""
    switches, mp = CONFIGS[config], config != "vanilla"
    torch.manual_seed(0)
    foreach = DiT(**TINY, **switches)
    fused = DiT(**TINY, **switches)
    fused.load_state_dict(foreach.state_dict())
    initial = {k: v.clone() for k, v in foreach.state_dict().items()}
    x, t, kwargs, _ = batch(seed=99)
    with torch.no_grad():
        fused.eval()(x, t, **kwargs)  # a monitor call before training
    fused.train()
    losses = [train_steps(m, optimizer(m, mp, **{kind: True}), 5) for m, kind in ((foreach, "foreach"), (fused, "fused"))]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(foreach.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((initial[k] - v).abs().max().item() for k, v in foreach.state_dict().items())
    assert moved > 20 * 1e-5, "the steps must move the weights well beyond the tolerance"  # vanilla: 5 x 1e-4
    fused.eval()
    with torch.no_grad():
        monitored = fused(x, t, **kwargs)
    torch.testing.assert_close(monitored, fused(x, t, **kwargs), rtol=1e-6, atol=1e-6)  # = a fresh forward


@pytest.mark.parametrize("mp", [False, True])
def test_bf16_autocast_training_is_finite_with_float32_norms(mp, monkeypatch):
    """train.py's GPU precision: a few steps under bf16 autocast stay finite and close to the float32
    steps (bf16 keeps 8 bits: 5% on the loss is several rounding errors of a sum of bf16 terms but far
    below a broken step), parameters and gradients stay float32, and every MP norm is taken in
    float32 although its input is bf16 (fp16 or bf16 norms lose the magnitude they control)."""
    norms = []
    vector_norm = torch.linalg.vector_norm

    def spy(x, *args, **kwargs):
        out = vector_norm(x, *args, **kwargs)
        norms.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(mp_layers.torch.linalg, "vector_norm", spy)
    torch.manual_seed(0)
    model = DiT(**TINY, mp=mp)
    reference = DiT(**TINY, mp=mp)
    reference.load_state_dict(model.state_dict())
    losses = train_steps(model, optimizer(model, mp), 3, autocast=torch.bfloat16)
    assert torch.isfinite(losses).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    if mp:
        assert any(x == torch.bfloat16 for x, _ in norms), "autocast did not reach the MP layers"
        assert {out for _, out in norms} == {torch.float32}, norms
    float32_losses = train_steps(reference, optimizer(reference, mp), 3)
    torch.testing.assert_close(losses, float32_losses, rtol=0.05, atol=0)


@pytest.mark.parametrize("mp", [False, True])
def test_compiled_loss_and_gradients_equal_eager(mp):
    """train.py --compile: the compiled model's training loss and gradients equal eager's. Backend
    aot_eager: the graph capture and the joint forward/backward graph of AOTAutograd that inductor
    also gets, run by eager kernels (inductor's code generation would take minutes on a CPU;
    benchmarks/gpu_check.py compiles with inductor on the GPU)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DiT(**TINY, mp=mp)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    diffusion = create_diffusion("")
    x, t, kwargs, noise = batch()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for m in (model, compiled):
        loss = diffusion.training_losses(m, x, t, kwargs, noise=noise)["loss"].mean()
        results.append((loss.detach(), torch.autograd.grad(loss, [p for _, p in trainable])))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(trainable, eager_grads, compiled_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
