"""Timestep respacing: sample with a subset of the training timesteps (DDPM "250", DDIM "ddim50")."""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    "ddimN": range(0, num_timesteps, stride) for the integer stride that gives exactly N steps.
    Otherwise a comma-separated string or list of ints: [0, num_timesteps) is cut into len(section_counts)
    equal sections and section i keeps section_counts[i] evenly strided steps, both of its ends included.
    E.g. (300, [10, 15, 20]): 10 steps of [0, 100), 15 of [100, 200), 20 of [200, 300).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    size, extra = divmod(num_timesteps, len(section_counts))
    steps, start = set(), 0
    for i, count in enumerate(section_counts):
        length = size + (i < extra)
        if count > length:
            raise ValueError(f"cannot take {count} steps from a section of {length}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += length
    return steps


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion restricted to use_timesteps: with kept steps k_0 < k_1 < ..., the new
    beta_i = 1 - abar[k_i] / abar[k_{i-1}] (abar[k_{-1}] = 1), so the kept alphas_cumprod are unchanged.
    The model is always called with the original timesteps k_i (long tensors), never with i."""

    def __init__(self, use_timesteps, *, betas, **kwargs):
        self.timestep_map = sorted(use_timesteps)
        self.original_num_steps = len(betas)
        kept = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[self.timestep_map]
        super().__init__(betas=1.0 - kept / np.append(1.0, kept[:-1]), **kwargs)
        self._timestep_map = torch.tensor(self.timestep_map, dtype=torch.long)

    def _call_model(self, model, x, t, **model_kwargs):
        return model(x, self._timestep_map.to(t.device)[t], **model_kwargs)
