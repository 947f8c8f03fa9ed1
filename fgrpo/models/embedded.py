"""The embedded model: a small pixel-space text-to-image rectified-flow model.

Its denoiser is diffusers' `SD3Transformer2DModel` (the SD3.5 architecture family
in a tiny configuration) and its text encoder a small transformers `CLIPTextModel`
with a word-level tokenizer over the shapes-task vocabulary, so every feature runs
on the same code path it will use for SD3.5. It works directly on 32x32 RGB pixels
in [-1, 1]: no VAE. Weights ship with the package (a few MB) and are reproduced by
`fgrpo pretrain configs/pretrain.toml`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from diffusers.utils import logging as diffusers_logging
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.utils import logging as transformers_logging

from fgrpo.models.base import FlowModel, PromptEmbeds
from fgrpo.tasks import shapes

# Loading a 10 MB model needs no progress bars.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "embedded"
MAX_TOKENS = 12
PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"


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
    def __init__(self, denoiser: SD3Transformer2DModel, text_encoder: CLIPTextModel, tokenizer: Tokenizer):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder.requires_grad_(False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, image_size=32, patch_size=4, num_layers=4, num_heads=4, head_dim=32,
              text_dim=64, text_layers=2) -> "EmbeddedFlowModel":
        """A freshly initialised model (random weights) of the given size."""
        if image_size % patch_size:
            raise ValueError(f"model.image_size={image_size} must be a multiple of model.patch_size={patch_size}")
        tokenizer = build_tokenizer()
        text_cfg = CLIPTextConfig(
            vocab_size=tokenizer.get_vocab_size(), hidden_size=text_dim, intermediate_size=2 * text_dim,
            num_hidden_layers=text_layers, num_attention_heads=max(1, text_dim // 32),
            max_position_embeddings=MAX_TOKENS, pad_token_id=0, eos_token_id=1, bos_token_id=1,
            projection_dim=text_dim,
        )
        denoiser = SD3Transformer2DModel(
            sample_size=image_size, patch_size=patch_size, in_channels=3, out_channels=3,
            num_layers=num_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
            joint_attention_dim=text_dim, caption_projection_dim=num_heads * head_dim,
            pooled_projection_dim=text_dim, pos_embed_max_size=image_size // patch_size,
        )
        return cls(denoiser, CLIPTextModel(text_cfg), tokenizer)

    @classmethod
    def from_config(cls, model_cfg) -> "EmbeddedFlowModel":
        c = model_cfg
        return cls.build(c.image_size, c.patch_size, c.num_layers, c.num_heads, c.head_dim, c.text_dim, c.text_layers)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "EmbeddedFlowModel":
        p = Path(path) if path else DEFAULT_WEIGHTS
        if not (p / "fgrpo_model.json").is_file():
            hint = "run `fgrpo pretrain configs/pretrain.toml` to create it" if path is None else "check model.path"
            raise FileNotFoundError(f"no embedded model weights at {p} (fgrpo_model.json missing); {hint}")
        denoiser = SD3Transformer2DModel.from_pretrained(p / "denoiser")
        text_encoder = CLIPTextModel.from_pretrained(p / "text_encoder")
        tokenizer = Tokenizer.from_file(str(p / "tokenizer.json"))
        return cls(denoiser.eval(), text_encoder.eval(), tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model to `path`, replacing it only once the new copy is complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
        try:
            self.denoiser.save_pretrained(tmp / "denoiser")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save(str(tmp / "tokenizer.json"))
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
        return (3, s, s)

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
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(-1, 1)
