"""`fgrpo pretrain`: a model comes out that loads, for pixel and latent models alike."""

import json

import numpy as np
import pytest
import torch

from fgrpo import config as C
from fgrpo.models.embedded import EmbeddedFlowModel
from fgrpo.pretrain import pretrain
from fgrpo.tasks import shapes


def tiny_pretrain_cfg(tmp_path, *extra):
    sets = ["model.image_size=16", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16",
            "model.text_dim=32", "model.text_layers=1", "pretrain.steps=4", "pretrain.batch_size=8",
            "pretrain.warmup=2", f'pretrain.out="{tmp_path / "model"}"', f'run.output_dir="{tmp_path / "run"}"',
            "run.progress=false", *extra]
    return C.load(None, sets)


def test_pretrain_writes_a_loadable_pixel_model(tmp_path, capsys):
    summary = pretrain(tiny_pretrain_cfg(tmp_path, "model.patch_size=4", "pretrain.steps=20"), progress=False)
    # Without a progress bar a line per tenth of the run says how far it is.
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain: step")]
    assert [line.split()[2] for line in lines] == [f"{k}/20" for k in range(2, 21, 2)]
    m = EmbeddedFlowModel.from_pretrained(tmp_path / "model")
    assert m.vae is None and m.state_shape == (3, 16, 16)
    assert summary["steps"] == 20 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["steps"] == 20


def test_pretrain_of_a_latent_model_fits_the_autoencoder_and_normalises_its_latents(tmp_path):
    cfg = tiny_pretrain_cfg(tmp_path, "model.latent_channels=4", "model.patch_size=1", "pretrain.vae_steps=60",
                            "pretrain.vae_lr=3e-3")
    summary = pretrain(cfg, progress=False)
    assert summary["vae_loss"] < 0.5 * summary["vae_loss_start"], summary
    m = EmbeddedFlowModel.from_pretrained(tmp_path / "model").eval()
    assert m.vae is not None and m.state_shape == (4, 4, 4)
    # Latents of fresh scenes have roughly zero mean and unit std: the scale the flow's noise assumes.
    scenes = shapes.uint8_to_tensor(shapes.render_batch(shapes.load_prompts("train")[:64], seed=5, size=16))
    z = m.encode_images(scenes)
    assert z.mean().abs() < 0.3 and 0.7 < z.std() < 1.4, (z.mean(), z.std())
    # The autoencoder reconstructs scenes far better than chance: black background and bright shapes.
    err = (m.decode(z) - scenes).abs().mean()
    assert err < 0.5 * (scenes - scenes.mean()).abs().mean(), err


def test_the_latent_pretrain_command_reports_both_stages(tmp_path, capsys):
    from pathlib import Path

    from fgrpo.cli import main

    config = Path(__file__).resolve().parent.parent / "configs" / "pretrain_latent.toml"
    sets = ["model.image_size=16", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16",
            "pretrain.vae_steps=2", "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.warmup=1",
            f'pretrain.out="{tmp_path / "model"}"', f'run.output_dir="{tmp_path / "run"}"', "run.progress=false"]
    assert main(["pretrain", str(config), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "autoencoder: 2 steps" in out and "pretrained 2 steps" in out
    assert EmbeddedFlowModel.from_pretrained(tmp_path / "model").state_shape == (4, 4, 4)


def test_caption_noise_draws_that_share_of_scenes_wrong_and_keeps_the_true_captions():
    from fgrpo.pretrain import scene_stream

    prompts = shapes.load_prompts("train")
    for noise, lo, hi in ((0.0, 1.0, 1.0), (0.5, 0.5, 0.8), (1.0, 1 / 3 - 0.1, 1 / 3 + 0.1)):
        batch, x = next(scene_stream(prompts, 256, 32, seed=2, caption_noise=noise))
        assert set(batch) <= set(prompts)
        strict = shapes.score_images(batch, shapes.images_to_uint8(x))["strict"].mean()
        # Task types are drawn uniformly and two of six (single objects, colours) stay exact.
        assert lo <= strict <= hi, (noise, strict)
    # Object neglect only: every wrong scene has fewer objects than its caption names.
    batch, x = next(scene_stream(prompts, 256, 32, seed=2, caption_noise=1.0, caption_errors="omit"))
    scores = shapes.score_images(batch, shapes.images_to_uint8(x))
    assert 1 / 3 - 0.1 <= scores["strict"].mean() <= 1 / 3 + 0.1
    found = [len(shapes.detect(im)) for im in shapes.images_to_uint8(x)]
    named = [sum(o.count for o in shapes.parse_prompt(p).objects) for p in batch]
    compositional = [shapes.parse_prompt(p).task not in ("single_object", "colors") for p in batch]
    assert all(f < n for f, n, c in zip(found, named, compositional) if c)


def test_pretrain_can_continue_from_a_model_and_keeps_its_autoencoder(tmp_path, monkeypatch):
    first = tmp_path / "first"
    pretrain(tiny_pretrain_cfg(first, "model.latent_channels=4", "model.patch_size=1", "pretrain.vae_steps=2"),
             progress=False)
    base = EmbeddedFlowModel.from_pretrained(first / "model")
    # The model.* shape settings are ignored: the model comes from `init`.
    errors_used = []
    miscaption = shapes.miscaption
    monkeypatch.setattr(shapes, "miscaption", lambda spec, rng, errors: errors_used.append(errors) or
                        miscaption(spec, rng, errors))
    summary = pretrain(tiny_pretrain_cfg(tmp_path, "model.image_size=32", f'pretrain.init="{first / "model"}"',
                                         "pretrain.caption_noise=0.5", "pretrain.caption_errors=omit"),
                       progress=False)
    assert errors_used and set(errors_used) == {"omit"}  # the setting reaches the scene stream
    assert summary["init"] == str(first / "model") and "vae_steps" not in summary
    tuned = EmbeddedFlowModel.from_pretrained(tmp_path / "model")
    assert tuned.state_shape == base.state_shape == (4, 4, 4)
    for a, b in zip(base.vae.state_dict().values(), tuned.vae.state_dict().values()):
        assert torch.equal(a, b)
    moved = [not torch.equal(a, b) for a, b in zip(base.denoiser.state_dict().values(),
                                                   tuned.denoiser.state_dict().values())]
    assert any(moved)


def test_a_missing_init_model_is_a_one_line_error_naming_the_setting(tmp_path):
    from fgrpo.config import UserError

    cfg = tiny_pretrain_cfg(tmp_path, f'pretrain.init="{tmp_path / "nowhere"}"')
    with pytest.raises(UserError) as e:
        pretrain(cfg, progress=False)
    msg = str(e.value)
    assert "pretrain.init" in msg and "nowhere" in msg and "\n" not in msg
    assert not (tmp_path / "model").exists()


def test_unrelated_caption_errors_draw_scenes_of_other_prompts_of_every_task():
    from fgrpo.pretrain import scene_stream

    prompts = shapes.load_prompts("train")
    batch, x = next(scene_stream(prompts, 256, 32, seed=4, caption_noise=1.0, caption_errors="unrelated"))
    assert set(batch) <= set(prompts)
    scores = shapes.score_images(batch, shapes.images_to_uint8(x))
    # Every scene is another prompt's, so even single objects and colours mostly fail their caption.
    tasks = [shapes.parse_prompt(p).task for p in batch]
    simple = np.array([t in ("single_object", "colors") for t in tasks])
    assert scores["strict"][simple].mean() < 0.35 and scores["strict"].mean() < 0.2
    # At noise 0.5 about half the scenes are their caption's; the rest are drawn for other prompts.
    batch, half = next(scene_stream(prompts, 256, 32, seed=4, caption_noise=0.5, caption_errors="unrelated"))
    strict_half = shapes.score_images(batch, shapes.images_to_uint8(half))["strict"].mean()
    assert 0.35 <= strict_half <= 0.65
    with pytest.raises(ValueError, match="unrelated"):
        next(scene_stream(prompts, 4, 32, seed=4, caption_noise=0.5, caption_errors="swap"))
    with pytest.raises(ValueError, match="two distinct"):  # one prompt has no other to draw: no endless loop
        next(scene_stream(["two circles"], 4, 32, seed=4, caption_noise=0.5, caption_errors="unrelated"))


def test_config_offers_exactly_the_caption_errors_the_stream_accepts():
    from fgrpo.pretrain import CAPTION_ERRORS

    # config.py keeps its own literal (it does not import the pretraining module): the two must agree.
    field = next(f for f in C.dataclasses.fields(C.PretrainConfig) if f.name == "caption_errors")
    assert tuple(field.metadata["choices"]) == CAPTION_ERRORS
    with pytest.raises(C.ConfigError, match="caption_errors"):
        C.load(None, ['pretrain.caption_errors="swap"'])


def test_pretrain_runs_on_run_device_and_says_so(tmp_path):
    from fgrpo.config import UserError

    summary = pretrain(tiny_pretrain_cfg(tmp_path, "model.patch_size=4", "run.device=\"cpu\""), progress=False)
    assert summary["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="run.device='cuda'"):
            pretrain(tiny_pretrain_cfg(tmp_path, "model.patch_size=4", "run.device=\"cuda\""), progress=False)


def test_ema_update_moves_trained_tensors_only():
    from fgrpo.pretrain import ema_update

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    w0, b0 = ema.weight.detach().clone(), ema.bias.detach().clone()
    ema_update(ema, model, 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * w0 + 0.25 * model.weight.detach())
    torch.testing.assert_close(ema.bias, b0)


def test_weakened_prompt_loss_targets_the_teachers_velocity_guided_at_the_strength(tmp_path):
    from fgrpo.pretrain import _noised, weakened_prompt_loss

    pretrain(tiny_pretrain_cfg(tmp_path, "model.patch_size=4"), progress=False)
    teacher = EmbeddedFlowModel.from_pretrained(tmp_path / "model").eval()
    student = EmbeddedFlowModel.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():  # a student that differs from its teacher
        for p in student.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["a red circle", "two squares", ""]
    x0 = torch.randn(3, *teacher.state_shape)
    loss = weakened_prompt_loss(student, teacher, x0, prompts, torch.Generator().manual_seed(3), 0.3)
    sigma, _, xt = _noised(x0, torch.Generator().manual_seed(3), 1.0)
    with torch.no_grad():
        v_c = teacher.velocity(xt, sigma, teacher.text_forward(prompts))
        v_u = teacher.velocity(xt, sigma, teacher.text_forward([""] * 3))
        v_s = student.velocity(xt, sigma, student.text_forward(prompts))
    target = v_u + 0.3 * (v_c - v_u)
    assert torch.allclose(loss, ((v_s - target) ** 2).mean(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(v_c, target, atol=1e-4)  # the prompt matters, so the strength does
    # A student equal to its teacher at strength 1 is already at its target.
    same = weakened_prompt_loss(teacher, teacher, x0, prompts, torch.Generator().manual_seed(3), 1.0)
    assert same.item() < 1e-10


def test_prompt_strength_distils_a_model_that_follows_its_prompt_that_much_without_guidance(tmp_path):
    first = tmp_path / "first"
    pretrain(tiny_pretrain_cfg(first, "model.patch_size=4", "pretrain.steps=30"), progress=False)
    summary = pretrain(tiny_pretrain_cfg(tmp_path, f'pretrain.init="{first / "model"}"', "pretrain.prompt_strength=0.25",
                                         "pretrain.steps=40", "pretrain.lr=3e-4", "pretrain.warmup=10",
                                         "pretrain.ema_decay=0.5"),
                       progress=False)
    assert summary["prompt_strength"] == 0.25
    teacher = EmbeddedFlowModel.from_pretrained(first / "model").eval()
    student = EmbeddedFlowModel.from_pretrained(tmp_path / "model").eval()
    prompts = shapes.load_prompts("train")[:16]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *teacher.state_shape, generator=g)
    sigma = torch.full((16,), 0.7)
    with torch.no_grad():
        v_c = teacher.velocity(x, sigma, teacher.encode_prompts(prompts))
        v_u = teacher.velocity(x, sigma, teacher.encode_prompts([""] * 16))
        v_student = student.velocity(x, sigma, student.encode_prompts(prompts))
    target = v_u + 0.25 * (v_c - v_u)
    # Before distillation the student was the teacher: its error was that of v_c; now it is far smaller.
    assert ((v_student - target) ** 2).mean() < 0.25 * ((v_c - target) ** 2).mean()


@pytest.mark.parametrize("extra, words", [
    ((), ["pretrain.prompt_strength", "pretrain.init"]),
    (('pretrain.init="somewhere"', "pretrain.caption_noise=0.3"), ["caption_noise", "prompt_strength"]),
])
def test_prompt_strength_settings_that_cannot_act_are_refused(extra, words):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, ["pretrain.prompt_strength=0.5", *extra])
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_the_weak_prompt_config_distils_its_init_model_and_says_so(tmp_path, capsys):
    from pathlib import Path

    from fgrpo.cli import main

    pretrain(tiny_pretrain_cfg(tmp_path / "first", "model.patch_size=4"), progress=False)
    config = Path(__file__).resolve().parent.parent / "configs" / "pretrain_weak_prompt.toml"
    sets = [f'pretrain.init="{tmp_path / "first" / "model"}"', "pretrain.steps=2", "pretrain.batch_size=4",
            "pretrain.warmup=1", f'pretrain.out="{tmp_path / "model"}"', f'run.output_dir="{tmp_path / "run"}"',
            "run.progress=false"]
    capsys.readouterr()
    assert main(["pretrain", str(config), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "prompt strength 0.4" in out and "pretrained 2 steps" in out
    assert json.loads((tmp_path / "run" / "pretrain.json").read_text())["prompt_strength"] == 0.4
