"""Magnitude monitoring: the RMS of the residual stream after each block and of each block's weights,
the quantities magnitude preservation is meant to keep flat, and a PNG plot of them over training."""
import torch
from PIL import Image, ImageDraw

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


def plot_magnitudes(records, path, size=(900, 380)):
    """records: [{"step", "act_rms": [per block], "weight_rms": [per block]}]. Writes a PNG with one
    panel per quantity, one line per block (light = first block, dark = last)."""
    width, height = size
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [r["step"] for r in records]
    for panel, key in enumerate(("act_rms", "weight_rms")):
        series = list(zip(*[r[key] for r in records]))
        lo = min(min(s) for s in series)
        hi = max(max(s) for s in series)
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        x0, y0, x1, y1 = panel * width + 70, 30, panel * width + width - 20, height - 40
        draw.rectangle([x0, y0, x1, y1], outline="black")
        title = "activation RMS after each block" if key == "act_rms" else "RMS of each block's weights"
        draw.text((x0, 8), title + " (light: first block, dark: last)", fill="black")
        draw.text((x0 - 60, y0), f"{hi:.3g}", fill="black")
        draw.text((x0 - 60, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y1 + 8), f"step {steps[0]}", fill="black")
        draw.text((x1 - 90, y1 + 8), f"step {steps[-1]}", fill="black")
        span = max(steps[-1] - steps[0], 1)
        for b, s in enumerate(series):
            shade = int(200 * (1 - b / max(len(series) - 1, 1)))
            points = [(x0 + (x1 - x0) * (st - steps[0]) / span, y1 - (y1 - y0) * (v - lo) / (hi - lo))
                      for st, v in zip(steps, s)]
            if len(points) == 1:
                points = points * 2
            draw.line(points, fill=(shade, shade, 255 - shade // 2), width=2)
    image.save(path)
