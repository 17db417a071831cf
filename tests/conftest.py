import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: thread start-up and contention on a busy machine cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """A stand-in Inception weights file: the real keys and shapes, random weights."""
    import feature_nets
    return feature_nets.random_inception_weights(tmp_path_factory.mktemp("inception") / feature_nets.INCEPTION_FILE)
