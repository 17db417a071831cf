"""Gaussian diffusion for DiT (create_diffusion builds the (respaced) diffusion from DiT's flags) and
flow matching on SiT's linear path (LinearFlow)."""
from .flow import TIME_DISTS, LinearFlow
from .gaussian_diffusion import GaussianDiffusion, get_named_beta_schedule
from .respace import SpacedDiffusion, space_timesteps

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "create_diffusion", "get_named_beta_schedule",
           "LinearFlow", "TIME_DISTS"]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    prediction="eps",
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """DiT's diffusion: timestep_respacing None or "" keeps all diffusion_steps, else e.g. "250" or "ddim50".
    Loss: vb * T if use_kl, else MSE + vb (vb scaled by T / 1000 if rescale_learned_sigmas).
    prediction: what the model predicts, "eps" (DiT), "x0" or "v".
    Variance: learned range if learn_sigma, else fixed beta~_t (sigma_small) or beta_t."""
    if use_kl:
        loss_type = "rescaled_kl"
    else:
        loss_type = "rescaled_mse" if rescale_learned_sigmas else "mse"
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps]),
        betas=get_named_beta_schedule(noise_schedule, diffusion_steps),
        model_mean_type=prediction,
        model_var_type=var_type,
        loss_type=loss_type,
    )
