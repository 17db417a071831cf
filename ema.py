"""Exponential moving averages of model weights.

Classic (DiT):         ema <- beta ema + (1 - beta) theta with a constant beta (0.9999).
Power function (EDM2): beta_t = (1 - 1/t)^(gamma + 1) at step t = 1, 2, ..., so the EMA at step t
                       averages theta_tau with weight profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
                       on [0, t]; its relative width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
Post-hoc reconstruction: snapshots of power EMAs with two gammas, saved at several steps, are
combined by least squares between the profiles into the EMA of any other sigma_rel.
"""
import copy
import math

import numpy as np
import torch


def sigma_rel_to_gamma(sigma_rel):
    """Largest real root of gamma^3 + 7 gamma^2 + (16 - sigma^-2) gamma + (12 - sigma^-2) = 0."""
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def valid_sigma_rel(sigma_rel):
    """Whether a power EMA of this relative width exists (gamma > -1): 0 < sigma_rel <= about 0.3002."""
    return 0 < sigma_rel < math.inf and sigma_rel_to_gamma(sigma_rel) > -1


def gamma_to_sigma_rel(gamma):
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(step, gamma):
    """beta_t = (1 - 1/t)^(gamma + 1) for the update made at step t (t = 1 gives beta = 0)."""
    return (1 - 1 / step) ** (gamma + 1)


def frozen_copy(model):
    """A copy for averaging: eval mode, no gradients (so it never trains or renormalises itself)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema_model, model, beta):
    """ema <- beta * ema + (1 - beta) * theta for every parameter (one fused foreach call)."""
    ema_params = list(ema_model.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)


def profile_inner_products(t_a, gamma_a, t_b, gamma_b):
    """Integral over tau of p_a(tau) p_b(tau) for power-EMA profiles ending at t_a and t_b:
    (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) max(t_a, t_b)) * (min / max)^(gamma of the longer)."""
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    ratio = np.where(t_a < t_b, t_a / t_b, t_b / t_a)
    exponent = np.where(t_a < t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b)) * ratio ** exponent


def posthoc_coefficients(in_steps, in_sigma_rels, out_step, out_sigma_rel):
    """Least-squares weights x (one per input snapshot) with sum_i x_i p_i ~ p_out in L2:
    solve A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_out>."""
    in_steps = np.asarray(in_steps, np.float64)
    in_gammas = np.array([sigma_rel_to_gamma(s) for s in in_sigma_rels])
    out_gamma = sigma_rel_to_gamma(out_sigma_rel)
    A = profile_inner_products(in_steps[:, None], in_gammas[:, None], in_steps[None, :], in_gammas[None, :])
    b = profile_inner_products(in_steps, in_gammas, out_step, out_gamma)
    return np.linalg.lstsq(A, b, rcond=None)[0]
