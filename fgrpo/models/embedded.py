"""The embedded model: a small text-to-image rectified-flow model.

Its denoiser is diffusers' `SD3Transformer2DModel` (the SD3.5 architecture family
in a tiny configuration) and its text encoder a small transformers `CLIPTextModel`
with a word-level tokenizer over the shapes-task vocabulary, so every feature runs
on the same code path it will use for SD3.5. The shipped model works directly on
32x32 RGB pixels in [-1, 1]; built with `latent_channels > 0` it flows in the latent
space of a small diffusers `AutoencoderKL` instead, as SD3.5 does (4x downsampling:
8x8 latents for 32x32 images). Weights ship with the package (a few MB) and are
reproduced by `fgrpo pretrain configs/pretrain.toml`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.utils import logging as diffusers_logging
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.tasks import shapes

# Loading a 10 MB model needs no progress bars.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = SHIPPED_WEIGHTS / "embedded"
SHIPPED_PREFIX = "shipped:"

MAX_TOKENS = 12
PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
VAE_CHANNELS = (16, 32, 64)  # AutoencoderKL block widths: three blocks downsample 4x
VAE_FACTOR = 2 ** (len(VAE_CHANNELS) - 1)


def weights_dir(path: str | os.PathLike | None) -> Path:
    """The directory a `model.path` names: empty = the default shipped model, "shipped:NAME" = the
    model shipped in fgrpo/weights/NAME (wherever fgrpo is installed), anything else a local directory."""
    if not path:
        return DEFAULT_WEIGHTS
    text = str(path)
    if text.startswith(SHIPPED_PREFIX):
        name = text[len(SHIPPED_PREFIX):]
        names = sorted(d.name for d in SHIPPED_WEIGHTS.iterdir() if (d / "fgrpo_model.json").is_file())
        if name not in names:
            raise FileNotFoundError(f"no shipped model {name!r} in {path!r}; shipped models: "
                                    + ", ".join(SHIPPED_PREFIX + n for n in names))
        return SHIPPED_WEIGHTS / name
    return Path(path)


def task_vocabulary() -> list[str]:
    """Every word the shapes task's prompts use (plus plural forms)."""
    words = ["a", "and", "of"] + [w for r in shapes.RELATIONS for w in r.split()]
    words += list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES] + [s + "es" for s in shapes.SHAPES]
    words += list(shapes.COLORS) + list(shapes.NUMBERS.values())
    return list(dict.fromkeys(words))


def build_tokenizer() -> Tokenizer:
    # EOS must not get id 2: CLIP's pooling treats eos_token_id == 2 as a legacy config.
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in task_vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=vocab[PAD], pad_token=PAD, length=MAX_TOKENS)
    return tok


class EmbeddedFlowModel(FlowModel):
    def __init__(self, denoiser: SD3Transformer2DModel, text_encoder: CLIPTextModel, tokenizer: Tokenizer,
                 vae: AutoencoderKL | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder.requires_grad_(False)
        # Latent models only; frozen here (pretraining trains it in a stage of its own).
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, image_size=32, patch_size=4, num_layers=4, num_heads=4, head_dim=32,
              text_dim=64, text_layers=2, latent_channels=0) -> "EmbeddedFlowModel":
        """A freshly initialised model (random weights) of the given size.

        With `latent_channels > 0` the denoiser works on (latent_channels, image_size / 4,
        image_size / 4) AutoencoderKL latents and `patch_size` counts latent pixels.
        """
        vae = None
        grid, channels = image_size, 3
        if latent_channels:
            if image_size % VAE_FACTOR:
                raise ValueError(f"model.image_size={image_size} must be a multiple of {VAE_FACTOR} for a latent model")
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
                up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS), block_out_channels=VAE_CHANNELS,
                layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=image_size,
                shift_factor=0.0, scaling_factor=1.0,
            )
            grid, channels = image_size // VAE_FACTOR, latent_channels
        if grid % patch_size:
            what = f"the latent side (image_size / {VAE_FACTOR})" if latent_channels else "model.image_size"
            raise ValueError(f"{what}={grid} must be a multiple of model.patch_size={patch_size}")
        tokenizer = build_tokenizer()
        text_cfg = CLIPTextConfig(
            vocab_size=tokenizer.get_vocab_size(), hidden_size=text_dim, intermediate_size=2 * text_dim,
            num_hidden_layers=text_layers, num_attention_heads=max(1, text_dim // 32),
            max_position_embeddings=MAX_TOKENS, pad_token_id=0, eos_token_id=1, bos_token_id=1,
            projection_dim=text_dim,
        )
        denoiser = SD3Transformer2DModel(
            sample_size=grid, patch_size=patch_size, in_channels=channels, out_channels=channels,
            num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
            joint_attention_dim=text_dim, caption_projection_dim=num_heads * head_dim,
            pooled_projection_dim=text_dim, pos_embed_max_size=grid // patch_size,
        )
        return cls(denoiser, CLIPTextModel(text_cfg), tokenizer, vae)

    @classmethod
    def from_config(cls, model_cfg) -> "EmbeddedFlowModel":
        c = model_cfg
        return cls.build(c.image_size, c.patch_size, c.num_layers, c.num_heads, c.head_dim, c.text_dim, c.text_layers,
                         c.latent_channels)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "EmbeddedFlowModel":
        p = weights_dir(path)
        if not (p / "fgrpo_model.json").is_file():
            hint = "run `fgrpo pretrain configs/pretrain.toml` to create it" if path is None else "check model.path"
            raise FileNotFoundError(f"no embedded model weights at {p} (fgrpo_model.json missing); {hint}")
        denoiser = SD3Transformer2DModel.from_pretrained(p / "denoiser")
        text_encoder = CLIPTextModel.from_pretrained(p / "text_encoder")
        tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
        vae = AutoencoderKL.from_pretrained(p / "vae") if (p / "vae").is_dir() else None
        return cls(denoiser.eval(), text_encoder.eval(), tokenizer, vae)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model to `path`, replacing it only once the new copy is complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            self.denoiser.save_pretrained(tmp / "denoiser")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save(str(tmp / "tokenizer.json"))
            if self.vae is not None:
                self.vae.save_pretrained(tmp / "vae")
            (tmp / "fgrpo_model.json").write_text(json.dumps({"kind": "embedded", "state_shape": list(self.state_shape)}))
            if path.exists():
                old = path.with_name(path.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ FlowModel

    @property
    def state_shape(self) -> tuple[int, ...]:
        s = self.denoiser.config.sample_size
        return (self.denoiser.config.in_channels, s, s)

    @property
    def image_size(self) -> int:
        s = self.denoiser.config.sample_size
        return s * VAE_FACTOR if self.vae is not None else s

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        return torch.tensor(ids, dtype=torch.long, device=self.text_encoder.device)

    def text_forward(self, prompts: list[str]) -> PromptEmbeds:
        """Differentiable text encoding (used by pretraining, which trains the encoder)."""
        ids = self.tokenize(prompts)
        out = self.text_encoder(input_ids=ids, attention_mask=(ids != 0).long())
        return PromptEmbeds(out.last_hidden_state, out.pooler_output)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        return self.text_forward(prompts)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds) -> torch.Tensor:
        dtype = self.denoiser.dtype
        sigma = sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma
        out = self.denoiser(
            hidden_states=x.to(dtype), encoder_hidden_states=embeds.tokens.to(dtype),
            pooled_projections=embeds.pooled.to(dtype), timestep=sigma.to(dtype) * 1000, return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) to flow states: the images themselves, or normalised latents."""
        if self.vae is None:
            return images.float()
        c = self.vae.config
        return (self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode().float() - c.shift_factor) * c.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return x.float().clamp(-1, 1)
        c = self.vae.config
        z = x.float() / c.scaling_factor + c.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)
