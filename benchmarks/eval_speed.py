"""Feature-extraction speed of fid.py's networks on this machine, with random weights of the real
architectures (speed does not depend on the weights' values):

    python benchmarks/eval_speed.py --inception 40 --dinov2 6      # images timed (256 px), scaled to 10K
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402
import feature_nets  # noqa: E402


def timed(network, images, batch_size):
    start = time.time()
    evaluation.extract_features(network, images, batch_size=batch_size, progress=False)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inception", type=int, default=40, help="images through Inception (0: skip)")
    parser.add_argument("--dinov2", type=int, default=6, help="images through DINOv2 ViT-L/14 (0: skip)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (max(args.inception, args.dinov2), args.size, args.size, 3),
                                               dtype=np.uint8)
    print(f"{args.device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.inception:
            net = feature_nets.InceptionNet(feature_nets.random_inception_weights(os.path.join(tmp, "inception.pth")),
                                            args.device)
            seconds = timed(net, images[:args.inception], 50)
            rate = args.inception / seconds
            print(f"Inception: {args.inception} images in {seconds:.1f} s, {rate:.2f} img/s; 10K images: {1e4 / rate / 60:.0f} min")
        if args.dinov2:
            import timm
            model = timm.create_model(feature_nets.DINOV2_ARCH, img_size=518, num_classes=0)
            path = os.path.join(tmp, "dinov2.pth")
            torch.save(dict(model.state_dict(), mask_token=torch.zeros(1, model.embed_dim)), path)
            del model
            seconds = timed(feature_nets.DINOv2Net(path, args.device), images[:args.dinov2], 10)
            rate = args.dinov2 / seconds
            print(f"DINOv2 ViT-L/14: {args.dinov2} images in {seconds:.1f} s, {rate:.2f} img/s; 10K images: {1e4 / rate / 60:.0f} min")


if __name__ == "__main__":
    main()
