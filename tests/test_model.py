"""The embedded model: save/load round trip, prompt encoding, seeded sampling."""

from pathlib import Path

import pytest
import torch

from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.sampling import flow_sigmas, sample_ode


def test_save_load_round_trip_gives_identical_outputs(tiny_model_dir, tmp_path):
    m = EmbeddedFlowModel.from_pretrained(tiny_model_dir)
    m.save_pretrained(tmp_path / "copy")
    m2 = EmbeddedFlowModel.from_pretrained(tmp_path / "copy")
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(2, *m.state_shape)
    emb = m.encode_prompts(["a red circle", "three squares"])
    torch.testing.assert_close(m.velocity(x, torch.tensor([0.5, 0.9]), emb),
                               m2.velocity(x, torch.tensor([0.5, 0.9]), m2.encode_prompts(["a red circle", "three squares"])),
                               rtol=0, atol=0)


def test_overwriting_a_saved_model_is_atomic(tiny_model_dir, tmp_path):
    m = EmbeddedFlowModel.from_pretrained(tiny_model_dir)
    m.save_pretrained(tmp_path / "m")
    m.save_pretrained(tmp_path / "m")  # replaces the directory whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    EmbeddedFlowModel.from_pretrained(tmp_path / "m")


def test_missing_weights_error_names_the_path(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        EmbeddedFlowModel.from_pretrained(tmp_path)


def test_prompts_encode_distinctly_and_unique_encoding_matches(tiny_model_dir):
    m = EmbeddedFlowModel.from_pretrained(tiny_model_dir)
    prompts = ["a red circle", "a blue circle", "a red circle", ""]
    e = m.encode_prompts(prompts)
    assert not torch.allclose(e.pooled[0], e.pooled[1])
    torch.testing.assert_close(e.pooled[0], e.pooled[2])
    u = m.encode_unique(prompts)
    torch.testing.assert_close(u.tokens, e.tokens)
    torch.testing.assert_close(u.pooled, e.pooled)
    # Out-of-vocabulary words map to [UNK] rather than failing.
    assert m.tokenize(["a zebra"])[0, 1].item() == 2


def test_seeded_sampling_is_reproducible_and_batch_size_independent(tiny_model_dir):
    m = EmbeddedFlowModel.from_pretrained(tiny_model_dir).eval()
    prompts = ["a circle", "two squares", "a red cross", "a triangle above a circle", "a green square"]
    a = sample_ode(m, prompts, num_steps=4, guidance_scale=3.0, seed=7, batch_size=5)
    b = sample_ode(m, prompts, num_steps=4, guidance_scale=3.0, seed=7, batch_size=2)
    c = sample_ode(m, prompts, num_steps=4, guidance_scale=3.0, seed=8, batch_size=5)
    assert a.shape == (5, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().mean() > 0.05


def test_sigma_grid_endpoints():
    s = flow_sigmas(40, 3.0)
    assert s.shape == (41,) and s[0] == 1.0 and s[-1] == 0.0 and (s[1:] < s[:-1]).all()


def test_shipped_weights_load_by_default_and_fit_the_budget():
    from fgrpo.models.embedded import DEFAULT_WEIGHTS

    size = sum(p.stat().st_size for p in DEFAULT_WEIGHTS.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    m = EmbeddedFlowModel.from_pretrained().eval()
    assert m.state_shape == (3, 32, 32)
    x = sample_ode(m, ["a red circle"], num_steps=2, guidance_scale=1.0, seed=0)
    assert torch.isfinite(x).all()


def test_latent_model_round_trip_and_decodes_to_images(tiny_latent_model_dir, tmp_path):
    m = EmbeddedFlowModel.from_pretrained(tiny_latent_model_dir).eval()
    assert m.vae is not None and m.state_shape == (4, 4, 4) and m.image_size == 16
    m.save_pretrained(tmp_path / "copy")
    m2 = EmbeddedFlowModel.from_pretrained(tmp_path / "copy").eval()
    z = torch.randn(3, *m.state_shape)
    torch.testing.assert_close(m.decode(z), m2.decode(z), rtol=0, atol=0)
    assert m.decode(z).shape == (3, 3, 16, 16)
    x = sample_ode(m, ["a red circle", "two squares"], num_steps=3, guidance_scale=2.0, seed=0)
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # Images go to latents of the flow's state shape, and the autoencoder stays frozen.
    assert m.encode_images(x).shape == (2, *m.state_shape)
    assert not any(p.requires_grad for p in m.vae.parameters())


def test_latent_model_rejects_sizes_the_autoencoder_cannot_halve():
    import pytest

    with pytest.raises(ValueError, match="multiple of 4"):
        EmbeddedFlowModel.build(image_size=18, patch_size=1, latent_channels=4)
    with pytest.raises(ValueError, match="patch_size"):
        EmbeddedFlowModel.build(image_size=16, patch_size=3, latent_channels=4)


def test_model_path_names_a_local_directory_or_a_shipped_model(tmp_path):
    from fgrpo.models.embedded import DEFAULT_WEIGHTS, SHIPPED_WEIGHTS, weights_dir

    assert weights_dir("") == weights_dir(None) == DEFAULT_WEIGHTS
    assert weights_dir("shipped:embedded") == DEFAULT_WEIGHTS
    assert weights_dir(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError) as e:
        weights_dir("shipped:nothing_like_it")
    msg = str(e.value)
    assert "nothing_like_it" in msg and "shipped:embedded" in msg and "\n" not in msg
    # Every shipped name the error offers loads.
    for d in SHIPPED_WEIGHTS.iterdir():
        if (d / "fgrpo_model.json").is_file():
            assert f"shipped:{d.name}" in msg


def test_a_bad_shipped_model_name_is_a_one_line_cli_error(tmp_path, capsys):
    from fgrpo.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "geneval.toml"
    rc = main(["eval", str(config), "--set", "model.path=shipped:nothing_like_it",
               "--set", f'run.output_dir="{tmp_path}"'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "shipped:nothing_like_it" in err[0]


def test_the_shipped_weak_prompt_latent_model_loads_by_name_and_fits_the_budget():
    from fgrpo.models.embedded import weights_dir

    d = weights_dir("shipped:latent_weak_prompt")
    assert sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) <= 20 * 2**20
    m = EmbeddedFlowModel.from_pretrained("shipped:latent_weak_prompt").eval()
    assert m.vae is not None and m.state_shape == (4, 8, 8)
    x = sample_ode(m, ["a red circle"], num_steps=2, guidance_scale=4.5, seed=0)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
