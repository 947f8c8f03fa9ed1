"""The model-agnostic flow-model interface every sampler and trainer talks to.

A model encodes prompts, predicts the rectified-flow velocity v(x_t, sigma, c) and
decodes its state space to images in [-1, 1]. SD3.5 and FLUX implement the same
four members as the embedded model, so rollouts and training never branch on the
model family.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class PromptEmbeds(NamedTuple):
    """Text conditioning: token embeddings (B, L, D) and pooled embeddings (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def index(self, idx: torch.Tensor | slice) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens[idx], self.pooled[idx])

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))


class FlowModel(nn.Module):
    """Base class: subclasses set `denoiser` (the trainable network) and implement the methods."""

    denoiser: nn.Module

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape (C, H, W) of one sample in the space the flow runs in (latents or pixels)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        """v(x, sigma, c) for a batch; `sigma` has shape (B,) in [0, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Map final states to images in [-1, 1], shape (B, 3, H, W)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        """Encode each distinct prompt once and expand to the batch (rollouts repeat prompts G times)."""
        unique = list(dict.fromkeys(prompts))
        emb = self.encode_prompts(unique)
        where = {p: i for i, p in enumerate(unique)}
        idx = torch.tensor([where[p] for p in prompts], device=emb.tokens.device)
        return emb.index(idx)


def load_model(model_cfg, device: torch.device | str = "cpu") -> FlowModel:
    """Build the model a `[model]` config section names, from local weights only."""
    if model_cfg.kind == "embedded":
        from fgrpo.models.embedded import EmbeddedFlowModel

        model = EmbeddedFlowModel.from_pretrained(model_cfg.path or None)
    else:  # the config validator only admits known kinds
        raise ValueError(f"model.kind={model_cfg.kind!r} is not supported")
    dtype = getattr(torch, model_cfg.dtype)
    if model.denoiser.dtype != dtype:
        model.denoiser.to(dtype=dtype)
    return model.to(device)
