"""What one sampling forward costs against one training step, for experiments/study.py's estimate.

    python benchmarks/sample_cost.py                  # the study's cpu profile: DiT-XS/4, depth 4, width 128
    python benchmarks/sample_cost.py --rounds 20 --sample-batch 512

Times, interleaved in one process on one thread, a training step (forward, backward, Adam) at
--train-batch and a no-grad forward at --sample-batch, for vanilla DiT and MaP-DiT, and prints the
ratio forward / step: a ratio holds on a shared CPU where absolute times do not. The study's
estimate multiplies it by the measured s/step of the grid and divides by the batch to get the cost
of one sample through one DDIM step. Medians of the middle rounds (the first two are warm-up).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import DiT_models  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12, help="timed rounds of step + forward (default 12)")
    p.add_argument("--train-batch", type=int, default=64, help="training batch (default 64, the study's)")
    p.add_argument("--sample-batch", type=int, default=256, help="sampling batch (default 256, train.py's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for mp in (False, True):
        model = DiT_models["DiT-XS/4"](input_size=32, in_channels=3, num_classes=10, depth=4, hidden_size=128,
                                       num_heads=4, mp=mp)
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def batch(n):
            return torch.randn(n, 3, 32, 32), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
        train_batch, sample_batch = batch(args.train_batch), batch(args.sample_batch)

        def step():
            model(*train_batch).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

        def forward():
            with torch.no_grad():
                model(*sample_batch)
        steps, forwards = [], []
        for _ in range(args.rounds):
            steps.append(timed(step))
            forwards.append(timed(forward))
        s, f = (float(torch.tensor(t[2:]).median()) for t in (steps, forwards))
        print(f"{'MaP-DiT' if mp else 'vanilla'}: training step at batch {args.train_batch} {s:.3f} s, forward at "
              f"batch {args.sample_batch} {f:.3f} s, ratio {f / s:.2f}")


if __name__ == "__main__":
    main()
