"""Export one set of a run's weights as a folder others can load: model.safetensors, config.json and a
model card (README.md), the layout of diffusion transformers shared on the Hugging Face Hub.

    python export.py results/000-MaP-DiT-S-2 --weights ema-0.1 --out exports/map-dit-s2
    python sample.py --ckpt exports/map-dit-s2 --class-label 1 2 3      # also --guide, and Hub ids owner/name
    huggingface-cli upload owner/map-dit-s2 exports/map-dit-s2           # share it
    python export.py results/001-DiT-B-2 --diffusers --out exports/dit-b2-diffusers   # vanilla DiT only

config.json: {"format": EXPORT_FORMAT, "architecture": {model, depth, hidden_size, num_heads, patch_size,
mp, modulation, learn_sigma, every MP switch}, "objective": "ddpm" (and the run's time_dist, logit_mean,
logit_std where it has them), "prediction", "data": {kind, shape, num_classes, class_names,
channel_mean, channel_std, vae, image_size, source}, "weights", "step", "training": {num_steps,
global_batch_size, lr, ...}}. sample.py builds the model from it with runs.build_model.

--diffusers writes diffusers' DiTTransformer2DModel (save_pretrained) instead, for a vanilla DiT (every
switch off, adaLN, learned sigma, eps prediction of the DDPM objective): DiTPipeline can sample it.
"""
import argparse
import os
import sys

import torch

from cli import ArgumentParser, UsageError, run_command
from data import atomic_write, write_json, write_text
from models import MP_SWITCHES
from plots import read_metrics
from runs import load_checkpoint, run_name
from sample import EXPORT_CONFIG, EXPORT_FORMAT, EXPORT_WEIGHTS, OBJECTIVE_KEYS, checkpoint_file, run_model

DATA_KEYS = ("kind", "shape", "num_classes", "class_names", "channel_mean", "channel_std", "vae", "image_size",
             "source")  # of the dataset's manifest: what sampling and decoding need, and what the data was
TRAINING_KEYS = ("num_steps", "global_batch_size", "lr", "warmup_steps", "decay_steps", "grad_clip", "ema_decay",
                 "ema_sigma_rels", "hflip", "precision", "seed")  # how the run trained, for the model card


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("run", metavar="RUN_OR_CKPT", help="a train.py run directory (its latest checkpoint) or checkpoint")
    p.add_argument("--weights", metavar="W", help="as sample.py --weights: raw, ema, or ema-<sigma_rel> tracked or "
                   "post hoc (default: the widest tracked power EMA, else ema)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--diffusers", action="store_true", help="write diffusers' DiTTransformer2DModel instead "
                   "(vanilla DiT only)")
    return p.parse_args(argv)


def export_config(saved, manifest, model, weights, step):
    """config.json of an export: what runs.build_model needs, the objective, the data and the weights' origin."""
    architecture = {"model": saved["model"], "depth": len(model.blocks), "hidden_size": model.pos_embed.shape[-1],
                    "num_heads": model.num_heads, "patch_size": model.patch_size, "mp": bool(saved["mp"]),
                    "modulation": model.modulation, "learn_sigma": model.learn_sigma, **model.switches.as_dict()}
    return {"format": EXPORT_FORMAT, "architecture": architecture, "objective": saved.get("objective", "ddpm"),
            **{k: saved[k] for k in OBJECTIVE_KEYS[1:] if k in saved}, "prediction": saved["prediction"],
            "data": {k: manifest.get(k) for k in DATA_KEYS}, "weights": weights, "step": step,
            "training": {k: saved.get(k) for k in TRAINING_KEYS}}


def not_vanilla(config):
    """Why diffusers' DiTTransformer2DModel cannot hold this model (one line), or None where it can."""
    arch = config["architecture"]
    on = [name for name in MP_SWITCHES if arch[name]]
    if on:
        return (f"a magnitude-preserving model ({', '.join(on)}): diffusers' DiTTransformer2DModel has none of "
                f"these layers, so it needs this repository; export without --diffusers and load it with sample.py")
    other = {"modulation": (arch["modulation"], "adaln"), "learn_sigma": (arch["learn_sigma"], True),
             "objective": (config["objective"], "ddpm"), "prediction": (config["prediction"], "eps")}
    differ = [f"{k} {ours}" for k, (ours, dit) in other.items() if ours != dit]
    if differ:
        return (f"{', '.join(differ)}: diffusers' DiTTransformer2DModel and DiTPipeline are DiT's (adaLN, learned "
                f"sigma, eps of the DDPM objective), so this model needs this repository; export without --diffusers")
    return None


def diffusers_state(state, depth):
    """A vanilla DiT state dict (this repository's keys, the official checkpoints') -> DiTTransformer2DModel's:
    qkv split into to_q, to_k, to_v; the timestep and label embedders copied into every block's norm1.emb
    (diffusers keeps one per block; its final layer reads block 0's); pos_embed left out (diffusers
    computes the same sin-cos table)."""
    out = {}
    renamed = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
               "proj_out_2": "final_layer.linear"}
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        renamed.update({block + "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
                        block + "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
                        block + "norm1.linear": f"blocks.{i}.adaLN_modulation.1",
                        block + "attn1.to_out.0": f"blocks.{i}.attn.proj",
                        block + "ff.net.0.proj": f"blocks.{i}.mlp.fc1", block + "ff.net.2": f"blocks.{i}.mlp.fc2"})
        out[block + "norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"]
        for p in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{p}"].chunk(3)
            out.update({f"{block}attn1.to_q.{p}": q, f"{block}attn1.to_k.{p}": k, f"{block}attn1.to_v.{p}": v})
    out.update({f"{theirs}.{p}": state[f"{ours}.{p}"] for theirs, ours in renamed.items() for p in ("weight", "bias")})
    return out


def to_diffusers(model):
    """DiTTransformer2DModel with the weights of a vanilla DiT of this repository. norm_eps 1e-6 is DiT's (the
    blocks' second LayerNorm; diffusers' default is 1e-5)."""
    from diffusers import DiTTransformer2DModel  # a slow import: only where it is used
    hidden = model.pos_embed.shape[-1]
    dit = DiTTransformer2DModel(num_attention_heads=model.num_heads, attention_head_dim=hidden // model.num_heads,
                                in_channels=model.in_channels, out_channels=model.out_channels,
                                num_layers=len(model.blocks), sample_size=model.input_size,
                                patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes, norm_eps=1e-6)
    dit.load_state_dict(diffusers_state(model.state_dict(), len(model.blocks)))
    return dit.eval()


def evaluations(run_dir, step):
    """The evaluation records of the run's metrics.jsonl up to step (train.py --eval-every), oldest first."""
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "eval" in r and r["step"] <= step]


def model_card(config, title, records, diffusers=False):
    """README.md: YAML front matter (library_name, tags), what the model is, how it trained, its evaluations."""
    arch, data, train = config["architecture"], config["data"], config["training"]
    on = [name for name in MP_SWITCHES if arch[name]]
    names = data["class_names"]
    classes = f"{data['num_classes']} classes" + (f" ({', '.join(map(str, names[:10]))}"
                                                  f"{', ...' if len(names) > 10 else ''})" if names else "")
    stats = (f"; latents normalised per channel with mean {data['channel_mean']} and std {data['channel_std']} "
             f"(decode x * std + mean with {data['vae']})" if data["kind"] == "latent"
             else "; pixels scaled from [0, 255] to [-1, 1]")
    lines = ["---", f"library_name: {'diffusers' if diffusers else 'map-dit'}", "tags:",
             *(f"- {t}" for t in ["diffusion", "dit", "class-conditional", "image-generation", "pytorch", "map-dit"]
               + ["magnitude-preserving"] * bool(on)), "---", "", f"# {title}", "",
             f"A class-conditional diffusion transformer: {arch['model']} (depth {arch['depth']}, width "
             f"{arch['hidden_size']}, {arch['num_heads']} heads, patch {arch['patch_size']}), {arch['modulation']} "
             f"modulation, MP switches {', '.join(on) if on else 'off (the original DiT)'}; it predicts "
             f"{config['prediction']} under the {config['objective']} objective. Data: {data['kind']} "
             f"{'x'.join(map(str, data['shape']))}, {classes}{stats}.", "",
             f"Weights: {config['weights']} at step {config['step']}.", "", "## Training", "",
             f"MaP-DiT's train.py, {train['num_steps']} steps at batch {train['global_batch_size']}, lr "
             f"{train['lr']} (warm-up {train['warmup_steps']}, decay {train['decay_steps']} steps), on "
             f"{data['source'] or 'its data'}; the rest of the recipe: " + ", ".join(f"{k} {train[k]}" for k in TRAINING_KEYS[5:]) + ".", "",
             "## Evaluation", "", *evaluation_lines(records), "", "## Use", "", *use_lines(data, diffusers)]
    return "\n".join(lines) + "\n"


def evaluation_lines(records):
    """The model card's table of the run's evaluations (metrics.jsonl records), or a line saying there are none."""
    if not records:
        return ["None: the run recorded no evaluation (train.py --eval-every)."]
    metrics = sorted({k for r in records for k in r["eval"]})
    return ["Recorded during training (train.py --eval-every), of the run's sampling weights (the widest power "
            "EMA, else the classic EMA), which are these weights only where the choice is the same:", "",
            "| step | samples | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|",
            *(f"| {r['step']} | {r.get('samples', '')} | " + " | ".join(
                f"{r['eval'][m]:.4g}" if m in r["eval"] else "" for m in metrics) + " |" for r in records)]


def use_lines(data, diffusers):
    """How the model card's reader loads the folder: with this repository's sample.py, or with diffusers."""
    if not diffusers:
        return ["With the MaP-DiT repository (it builds the model from config.json):", "",
                "    python sample.py --ckpt PATH_OR_HUB_ID --class-label 0 1 2",
                "    python sample.py --ckpt PATH_OR_HUB_ID --fid 50000"]
    lines = ["```python", "from diffusers import DiTTransformer2DModel",
             "model = DiTTransformer2DModel.from_pretrained(PATH_OR_HUB_ID)", "```", "",
             "diffusers embeds the timestep with frequencies 10000^(-i/127) where DiT trains with 10000^(-i/128) "
             "(as for the official DiT weights in diffusers), so its outputs differ slightly from MaP-DiT's at t > 0."]
    if data["kind"] != "latent":
        return lines + ["", "DiTPipeline decodes its samples with a VAE, so this pixel-space model runs without it."]
    return lines + ["", "```python", "from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline",
                    f"pipe = DiTPipeline(model, AutoencoderKL.from_pretrained({data['vae']!r}), DDIMScheduler())",
                    "```", "", "DiTPipeline guides with class 1000 as the null label (1000-class models only) and "
                    "decodes latents divided by the VAE's scaling_factor, which is this model's normalisation only "
                    "where channel_mean is 0 and channel_std 1 / scaling_factor."]


def main(args):
    path = checkpoint_file(args.run, "RUN_OR_CKPT")
    ckpt = load_checkpoint(path)
    model, saved, weights, note = run_model(ckpt, path, args.weights)
    config = export_config(saved, ckpt["manifest"], model, weights, ckpt["step"])
    refused = args.diffusers and not_vanilla(config)
    if refused:
        raise UsageError(f"--diffusers: {args.run} is {refused}")
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and not os.listdir(args.out)):
        raise UsageError(f"--out {args.out}: exists and is not an empty folder; name a new one")
    os.makedirs(args.out, exist_ok=True)
    records = evaluations(os.path.dirname(os.path.dirname(os.path.abspath(path))), ckpt["step"])
    title = f"{run_name(argparse.Namespace(**saved))} {weights} step {ckpt['step']}"
    if args.diffusers:
        to_diffusers(model).save_pretrained(args.out)
    else:
        from safetensors.torch import save  # safetensors' bytes, so that data.atomic_write puts them in place
        state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
        atomic_write(os.path.join(args.out, EXPORT_WEIGHTS), lambda f: f.write(save(state)))
        write_json(os.path.join(args.out, EXPORT_CONFIG), config, indent=2)
    write_text(os.path.join(args.out, "README.md"), model_card(config, title, records, args.diffusers))
    print(f"wrote {args.out}: {note}")
    return args.out


def cli(argv=None):
    """export.py as a command: 0; bad input one line and 2."""
    return run_command("export.py", lambda argv: main(parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(cli())
