"""What one sampling forward costs against one training step, for experiments/study.py's estimate.

    python benchmarks/sample_cost.py                  # the study's cpu profile: DiT-XS/4, depth 4, width 128
    python benchmarks/sample_cost.py --rounds 20 --sample-batch 512 --cfg-scale 4

Times, interleaved in one process on one thread, a training step (forward, backward, Adam) at
--train-batch and one sampling step at --sample-batch through sampling.py's path (DDIM, guidance by
guidance.Guided: --cfg-scale 1, the study's evaluation, is the conditional model alone; above 1 the
batch doubles), for vanilla DiT and MaP-DiT, and prints the ratio step of sampling / training step:
a ratio holds on a shared CPU where absolute times do not. The study's estimate multiplies it by the
measured s/step of the grid and divides by the batch to get the cost of one sample through one
DDIM step. Medians of the middle rounds (the first two are warm-up).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from guidance import Guided  # noqa: E402
from models import DiT_models  # noqa: E402
from sampling import denoise, make_sampler  # noqa: E402

SAMPLE_STEPS = 2  # the fewest DDIM allows; the time is divided by it


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12, help="timed rounds of step + forward (default 12)")
    p.add_argument("--train-batch", type=int, default=64, help="training batch (default 64, the study's)")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch (default 256, train.py's)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale of the sampling (default 1: none)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sampler = make_sampler("ddim", SAMPLE_STEPS)
    for mp in (False, True):
        model = DiT_models["DiT-XS/4"](input_size=32, in_channels=3, num_classes=10, depth=4, hidden_size=128,
                                       num_heads=4, mp=mp)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x, t, y = torch.randn(args.train_batch, 3, 32, 32), torch.randint(0, 1000, (args.train_batch,)), \
            torch.randint(0, 10, (args.train_batch,))
        z, labels = torch.randn(args.sample_batch, 3, 32, 32), torch.randint(0, 10, (args.sample_batch,))

        def step():
            model.train()
            model(x, t, y).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        def sample():
            model.eval()
            denoise(Guided(model, args.cfg_scale), sampler, z, labels)
        steps, samples = [], []
        for _ in range(args.rounds):
            steps.append(timed(step))
            samples.append(timed(sample) / SAMPLE_STEPS)
        s, f = (float(torch.tensor(times[2:]).median()) for times in (steps, samples))
        print(f"{'MaP-DiT' if mp else 'vanilla'}: training step at batch {args.train_batch} {s:.3f} s, sampling step "
              f"at batch {args.sample_batch} (cfg {args.cfg_scale:g}) {f:.3f} s, ratio {f / s:.2f}")


if __name__ == "__main__":
    main()
