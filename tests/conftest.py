import pytest
import torch


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """make(levels, channels, layers_per_block=2) -> directory of a saved AutoencoderKL with random
    weights, 4 latent channels and downsampling 2^(levels - 1): a stand-in for the SD VAE offline."""
    def make(levels, channels, layers_per_block=2):
        from diffusers import AutoencoderKL
        torch.manual_seed(0)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=channels,
                            layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=4,
                            sample_size=32)
        path = tmp_path_factory.mktemp("vae")
        vae.save_pretrained(path)
        return str(path)

    return make


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file with the keys and shapes of pytorch-fid's FID Inception and random weights
    (He-initialised convolutions, so that activations neither vanish nor explode over 94 layers)."""
    from unittest import mock
    from pytorch_fid import inception
    captured = {}

    def capture(module, state_dict, *args, **kwargs):
        captured.update(module.state_dict())

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", capture):
        inception.fid_inception_v3()
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, v in captured.items():
        if k.endswith("conv.weight"):
            v = torch.randn(v.shape, generator=gen) * (2 / v[0].numel()) ** 0.5
        elif k == "fc.weight":
            v = torch.randn(v.shape, generator=gen) / v.shape[1] ** 0.5
        state[k] = v.half() if v.is_floating_point() else v
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return str(path)
