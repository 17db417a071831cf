"""Magnitude monitoring: the RMS of the residual stream after each block and of each block's weights,
the quantities magnitude preservation is meant to keep flat (plots.py draws them over training)."""
import torch

from mp_layers import MPLinear


@torch.no_grad()
def block_magnitudes(model, x, t, y):
    """(activation RMS after each block, RMS of each block's stored weights) for one batch."""
    acts = []
    hooks = [b.register_forward_hook(lambda m, i, out: acts.append(out.float().pow(2).mean().sqrt().item()))
             for b in model.blocks]
    try:
        model(x, t, y)
    finally:
        for h in hooks:
            h.remove()
    weights = []
    for block in model.blocks:
        ws = [m.weight for m in block.modules() if isinstance(m, (torch.nn.Linear, MPLinear))]
        weights.append((sum(w.float().pow(2).sum() for w in ws) / sum(w.numel() for w in ws)).sqrt().item())
    return acts, weights
