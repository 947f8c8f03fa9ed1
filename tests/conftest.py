import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores in CI; fixed thread count keeps float reductions identical across runs.
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised, very small embedded model saved to disk (no shipped weights needed)."""
    from fgrpo.models.embedded import EmbeddedFlowModel

    torch.manual_seed(0)
    model = EmbeddedFlowModel.build(image_size=16, patch_size=4, num_layers=1, num_heads=2, head_dim=16,
                                    text_dim=32, text_layers=1)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_latent_model_dir(tmp_path_factory):
    """A very small *latent* embedded model (random autoencoder and denoiser) saved to disk."""
    from fgrpo.models.embedded import EmbeddedFlowModel

    torch.manual_seed(0)
    model = EmbeddedFlowModel.build(image_size=16, patch_size=1, num_layers=1, num_heads=2, head_dim=16,
                                    text_dim=32, text_layers=1, latent_channels=4)
    path = tmp_path_factory.mktemp("tiny_latent") / "model"
    model.save_pretrained(path)
    return path
