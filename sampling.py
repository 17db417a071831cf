"""One sampling path for sample.py and the in-run grids and evaluation of train.py: noise and labels
-> x_0 in model space by a sampler (ancestral DDPM, DDIM, DPM-Solver++ for a DDPM run; Euler, Heun,
SDE, dopri5 for a flow run) calling a guided model function (guidance.Guided) -> uint8 images
(data.decode).

    sampler = make_sampler("ddim", 50, prediction="v")
    z, y = chunk_inputs(seed, k, 64, (4, 16, 16), num_classes=1000)    # chunk k: depends on (seed, k) only
    images = sample_images(Guided(model, 1.5), sampler, z, y, manifest, vae)   # uint8 (64, 128, 128, 3)
    images, labels = sample_chunk(Guided(model, 1.5), sampler, manifest, seed, k, 64, vae)  # the same

An --fid run of N samples is chunks k of chunk_sizes(N, batch)[k] samples: any process that samples
chunk k with the same model and settings draws the same images.
"""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data import atomic_write, decode
from diffusion import create_diffusion
from diffusion.flow import dopri5_sample, euler_sample, heun_sample, sde_sample
from cli import UsageError

SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpm++"), "flow": ("euler", "heun", "sde", "dopri5")}  # by objective
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++": 25,
                 "euler": 50,  # one model call per step: DDIM's cost at its default
                 "heun": 25,  # two calls per step: 50 calls, the cost of euler 50 and ddim 50
                 "sde": 250,  # SiT's default (its FID 2.06); a first-order stochastic method needs many
                 "dopri5": None}  # adaptive: the solver chooses its steps
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "sde"}  # sample.py's: DiT's 250 ancestral steps, SiT's 250 SDE steps
GRID_SAMPLER = {"ddpm": "ddim", "flow": "euler"}  # train.py's grids and evaluation: deterministic, one call a step
FLOW_SAMPLERS = {"euler": euler_sample, "heun": heun_sample, "sde": sde_sample}
GRID_ZOOM_BELOW = 64  # grid images smaller than this many pixels are shown at twice their size
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
FLOW_PREDICTION = "velocity"  # what a flow model predicts: a run's prediction names its objective


def objective_of(prediction):
    """"flow" for a model predicting the velocity, else "ddpm" (eps, v or x0)."""
    return "flow" if prediction == FLOW_PREDICTION else "ddpm"


def sampling_weights_name(sigma_rels):
    """The --weights sample.py samples from by default (and train.py's grids and evaluation, with
    watch.sampling_weights): ema-<widest sigma_rel> tracked, else ema."""
    return f"ema-{max(sigma_rels)}" if sigma_rels else "ema"


def make_sampler(name, steps, prediction="eps", shift=1.0):
    """A function (model_fn, z (N, C, H, W), model_kwargs, clip_denoised) -> x_0 (N, C, H, W).

    DDPM samplers (SAMPLERS["ddpm"]) for a model predicting `prediction` (eps, v or x0):
    model_fn(x, t, **model_kwargs) gets the original integer timesteps t (N,).
    Flow samplers (SAMPLERS["flow"], diffusion/flow.py) integrate a velocity model from noise z at
    t = 0 to data at t = 1: model_fn gets float times t (N,) in [0, 1]; prediction and clip_denoised
    are unused.
    "euler" (steps calls), "heun" (2 steps calls), "sde" (SiT's Euler-Maruyama, steps calls) on a
    step grid shifted by SD3's `shift` (> 1: finer steps at the noise end; flow.shifted_times);
    "dopri5" adaptive (steps and shift unused)."""
    if name in FLOW_SAMPLERS:
        if steps < 1 or not 0 < shift < float("inf"):
            raise UsageError(f"{name} sampling needs at least 1 step and a positive time shift, got {steps}, {shift}")
        sample = FLOW_SAMPLERS[name]
        return lambda model_fn, z, model_kwargs, clip_denoised: sample(model_fn, z, model_kwargs, steps, shift)
    if name == "dopri5":
        return lambda model_fn, z, model_kwargs, clip_denoised: dopri5_sample(model_fn, z, model_kwargs)
    if name not in SAMPLERS["ddpm"]:
        raise UsageError(f"unknown sampler {name!r}: choose one of {', '.join(DEFAULT_STEPS)}")
    if name == "dpm++":
        from diffusers import DPMSolverMultistepScheduler  # a slow import: only where it is used
        betas = create_diffusion("").betas.tolist()
        timesteps = dpm_timesteps(steps, len(betas))

        def dpm_solver(model_fn, z, model_kwargs, clip_denoised):
            """DPM-Solver++(2M) on the model's prediction (its first C channels; learned sigmas and
            clip_denoised unused: the library's thresholding is off, as for latents)."""
            scheduler = DPMSolverMultistepScheduler(num_train_timesteps=len(betas), trained_betas=betas,
                                                    solver_order=2, algorithm_type="dpmsolver++",
                                                    prediction_type=DIFFUSERS_PREDICTION[prediction])
            scheduler.set_timesteps(timesteps=timesteps, device=z.device)
            x = z
            for t in scheduler.timesteps:
                out = model_fn(x, t.expand(len(x)), **model_kwargs)[:, : x.shape[1]]
                x = scheduler.step(out.float(), t, x).prev_sample
            return x
        return dpm_solver
    try:
        diffusion = create_diffusion(f"ddim{steps}" if name == "ddim" else str(steps), prediction=prediction)
    except ValueError as e:
        raise UsageError(f"--num-sampling-steps {steps}: {e}") from None
    loop = diffusion.ddim_sample_loop if name == "ddim" else diffusion.p_sample_loop
    return lambda model_fn, z, model_kwargs, clip_denoised: loop(
        model_fn, z.shape, noise=z, clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=z.device)


def dpm_timesteps(steps, num_timesteps=1000):
    """The `steps` timesteps DPM-Solver++ visits, highest first: diffusers' "linspace" spacing,
    round(linspace(0, T - 1, steps + 1))[steps:0:-1]. At steps = T its spacing (T - 1) / T < 1
    rounds two neighbours to one timestep, a step of length 0 that makes the solver divide 0 by 0
    (NaN); there every timestep is taken once, T - 1 .. 0."""
    if steps == num_timesteps:
        return list(range(num_timesteps - 1, -1, -1))
    return np.linspace(0, num_timesteps - 1, steps + 1).round()[:0:-1].astype(int).tolist()


@torch.no_grad()
def denoise(guided, sampler, z, y, bf16=False, clip_denoised=False):
    """Noise z (N, C, H, W) and labels y (N,) -> x_0 (N, C, H, W) float32 in model space, with guided a
    guidance.Guided (it calls the model, and the guide or the null label where it guides). bf16: the
    forward passes in bf16 autocast; the guidance and the sampler's arithmetic stay float32."""
    with torch.autocast(z.device.type, torch.bfloat16, enabled=bf16):
        return sampler(guided, z, dict(y=y), clip_denoised).float()


def chunk_inputs(seed, k, n, shape, num_classes=None):
    """Noise (n, *shape) and, given num_classes, uniform labels (n,) of chunk k: they depend only on
    (seed, k). The global torch RNG (DDPM's step noise) is seeded from (seed, k) as well."""
    chunk_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
    torch.manual_seed(chunk_seed)
    generator = torch.Generator().manual_seed(chunk_seed)
    y = None if num_classes is None else torch.randint(num_classes, (n,), generator=generator)
    return torch.randn((n, *shape), generator=generator), y


def chunk_sizes(total, batch_size):
    """The sizes of the chunks of `total` samples: batch_size each, the last one what is left."""
    return [min(batch_size, total - i) for i in range(0, total, batch_size)]


@torch.no_grad()
def sample_images(guided, sampler, z, y, manifest, vae=None, bf16=False):
    """uint8 images (N, H, W, 3), numpy, from noise z (N, C, h, w) and labels y (N,) on z's device:
    denoise, then denormalise and decode (the VAE for latents; pixel runs clip x_0 to [-1, 1] at
    each DDPM step, the flow samplers' output only when it becomes uint8). Raises FloatingPointError
    when a sample comes out non-finite (it would be black)."""
    x = denoise(guided, sampler, z, y.to(z.device), bf16, clip_denoised=manifest["kind"] == "pixel")
    if not torch.isfinite(x).all():
        raise FloatingPointError("the samples came out non-finite (NaN or inf)")
    return decode(x, manifest, vae)


def sample_chunk(guided, sampler, manifest, seed, k, n, vae=None, bf16=False):
    """Chunk k of n samples of an --fid run: (uint8 images (n, H, W, 3), labels (n,) int64 numpy) from
    chunk_inputs(seed, k), sampled on the device of the guided model."""
    z, y = chunk_inputs(seed, k, n, tuple(manifest["shape"]), int(manifest["num_classes"]))
    device = next(guided.model.parameters()).device
    return sample_images(guided, sampler, z.to(device), y, manifest, vae, bf16), y.numpy()


def save_grid(images, rows, path, names=None):
    """uint8 images (rows * columns, H, W, 3), row-major -> the grid (rows * H, columns * W, 3) written to
    the PNG at path (atomically; UsageError when it cannot be) and returned: images under
    GRID_ZOOM_BELOW pixels at twice their size, and names[i] (the class of row i) left of each row."""
    n, h, w, c = images.shape
    grid = images.reshape(rows, n // rows, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, c)
    if h < GRID_ZOOM_BELOW:
        grid = grid.repeat(2, 0).repeat(2, 1)
    if names:
        grid = name_rows(grid, names)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
    return grid


def name_rows(grid, names):
    """The grid (H, W, 3) with a black strip on its left that holds names[i] beside row i."""
    row = grid.shape[0] // len(names)
    font = ImageFont.load_default(size=max(8, min(16, row // 2)))
    strip = Image.new("RGB", (8 + max(round(font.getlength(name)) for name in names), grid.shape[0]))
    draw = ImageDraw.Draw(strip)
    for i, name in enumerate(names):
        draw.text((4, i * row + row // 2), name, fill="white", font=font, anchor="lm")
    return np.concatenate([np.asarray(strip), grid], axis=1)


def row_names(manifest, labels):
    """'label name' for each grid row's label where the manifest names its classes, else None."""
    names = manifest.get("class_names")
    return [f"{int(y)} {names[int(y)]}"[:24] for y in labels] if names else None
