"""The sigma switch shared by switch_eval.py and switch_train.py."""
import torch


def switch_velocity(model, base_denoiser, cut: float) -> None:
    """Make `model.velocity` run `base_denoiser` (frozen, no gradients) at sigma <= cut and the model's own
    denoiser above it. Every batch the samplers and the trainer pass shares one sigma."""
    own = model.velocity

    def velocity(x, sigma, embeds):
        if float(sigma.reshape(-1)[0]) > cut:
            return own(x, sigma, embeds)
        live = model.denoiser
        model.denoiser = base_denoiser
        try:
            with torch.no_grad():
                return own(x, sigma, embeds)
        finally:
            model.denoiser = live

    model.velocity = velocity
