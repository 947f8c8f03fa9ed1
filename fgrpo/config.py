"""Typed run configuration: TOML files map onto one dataclass per component.

Every knob is declared once here, with its type, allowed range and a doc string;
the shipped TOML files mirror these sections. Loading rejects unknown keys, wrong
types and out-of-range values with one line naming the file, the key and what is
allowed. Nothing here touches torch.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, bad reward); its message is one line."""


class ConfigError(UserError, ValueError):
    """A configuration mistake."""


def knob(default, doc: str, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A config field with its documentation and validation rules."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    kind: str = knob("embedded", "Which model family to load.", choices=("embedded",))
    path: str = knob("", "Directory with the model weights; empty loads the default model shipped with fgrpo, "
                     "'shipped:NAME' another shipped one (fgrpo/weights/NAME, e.g. 'shipped:latent_weak_prompt').")
    dtype: str = knob("float32", "Dtype of the denoiser's weights and activations (the SDE math is always fp32).",
                      choices=("float32", "bfloat16", "float16"))
    # Architecture of a freshly built embedded model (used by `fgrpo pretrain` only).
    image_size: int = knob(32, "Image side in pixels.", ge=8)
    latent_channels: int = knob(0, "0: the flow runs on pixels. > 0: it runs on AutoencoderKL latents with this many "
                                "channels at a quarter of image_size per side (as SD3.5 does); pretraining trains "
                                "the autoencoder first.", ge=0)
    patch_size: int = knob(4, "Transformer patch size, in pixels of the flow's state (latent pixels for a latent "
                           "model); tokens per image = (state side / patch_size)^2.", ge=1)
    num_layers: int = knob(4, "Joint-attention transformer blocks.", ge=1)
    num_heads: int = knob(5, "Attention heads per block.", ge=1)
    head_dim: int = knob(32, "Width of one attention head.", ge=8)
    text_dim: int = knob(64, "Width of the text encoder.", ge=8)
    text_layers: int = knob(2, "Text encoder layers.", ge=1)


@dataclass
class SampleConfig:
    num_steps: int = knob(10, "Denoising steps of a training rollout (the paper's 'denoising reduction': 10 for SD3.5).", ge=2)
    guidance_scale: float = knob(4.5, "CFG in rollouts and, identically, in the training forward (SD3.5: 4.5). "
                                 "1 is the cheaper no-CFG recipe (pair it with kind='cps', beta 0).", ge=1.0)
    shift: float = knob(3.0, "Time shift of the flow-matching sigma grid (SD3: 3).", gt=0.0)
    kind: str = knob("sde", "Stochastic sampler: 'sde' (Flow-GRPO) or 'cps' (coefficients-preserving).", choices=("sde", "cps"))
    noise_level: float = knob(0.7, "Noise level a of the SDE (SD3.5: 0.7; 0 is the deterministic ODE).", ge=0.0, le=1.0)
    group_size: int = knob(8, "Images per prompt (G). Advantages are relative within a group (paper: 24).", ge=1)
    groups_per_epoch: int = knob(8, "Distinct prompts sampled per epoch (paper: 48).", ge=1)
    batch_size: int = knob(32, "Images per model forward in rollouts; training uses the same size on purpose.", ge=1)
    sde_window: int = knob(0, "If > 0, only this many consecutive steps are stochastic and trained; the rest run the ODE.", ge=0)
    shared_group_noise: bool = knob(False, "Give the images of a group one initial noise, so rewards within a group differ only through the SDE noise the policy is trained on.")
    noise_block: int = knob(1, "SDE noise drawn once per noise_block x noise_block tile of the state (per channel) "
                            "and repeated inside it; the policy is the Gaussian of the tiles' means. 1 = white noise "
                            "(the paper). Larger tiles explore in fewer, coarser dimensions, which small batches "
                            "estimate better; must divide the state's height and width.", ge=1)
    task_sampling: str = knob("uniform", "How each epoch's prompts are drawn (shapes prompts): 'uniform' draws task "
                              "types uniformly; 'signal' draws them in proportion to their recent within-group reward "
                              "spread, so task types the model already solves (all-equal groups, no learning signal) "
                              "give their rollouts to the ones it does not.", choices=("uniform", "signal"))
    task_floor: float = knob(0.05, "task_sampling='signal': a task type's weight never falls below this (in reward-std "
                             "units), so a solved task is still sampled now and then and its regressions are seen.",
                             ge=0.0, le=1.0)
    window_range: list = knob([0, 5], "Steps [first, last) from which the SDE window's start is drawn each epoch.")
    seed: int = knob(0, "Seed for prompt choice and noise; a run is reproducible for a given seed.", ge=0)
    sde_backend: str = knob("auto", "SDE step implementation: 'auto' (the fused op: Triton on CUDA, native C++ on "
                            "CPU when built, its torch form otherwise), or force 'reference' (pure torch), 'native' "
                            "or 'triton'.",
                            choices=("auto", "reference", "native", "triton"))
    cuda_graph: bool = knob(True, "Rollout engine: capture each rollout (and evaluation's ODE sampling) as one CUDA "
                            "graph per shape and replay it per batch. CUDA only, and needs the fused Triton SDE op "
                            "(sde_backend 'auto'); on the CPU, or if capture fails, rollouts run eager after one "
                            "logged line. It changes speed, not samples.")
    compile: str = knob("none", "torch.compile mode of the model's velocity in rollouts and evaluation: 'none' "
                        "(eager kernels: the rollout's numerics match the training forward exactly), 'default' "
                        "(inductor; minutes of compiling per shape, faster steps) or 'max-autotune-no-cudagraphs' "
                        "(longer compile, autotuned matmuls). Compiled rollouts differ from the eager training "
                        "forward by rounding, which the on-policy check (train.ratio_tol) bounds. 'reduce-overhead' "
                        "is not offered: the engine owns CUDA graph capture (sample.cuda_graph).",
                        choices=("none", "default", "max-autotune-no-cudagraphs"))


@dataclass
class TrainConfig:
    epochs: int = knob(60, "Sampling epochs (each: rollouts, rewards, then policy updates).", ge=0)
    inner_epochs: int = knob(1, "Passes over each epoch's rollouts.", ge=1)
    lr: float = knob(3e-4, "AdamW learning rate (paper: 3e-4 with LoRA).", gt=0.0)
    weight_decay: float = knob(1e-4, "AdamW weight decay.", ge=0.0)
    lr_schedule: str = knob("constant", "Learning-rate schedule over the run's train.epochs: 'constant', or 'cosine' from "
                            "train.lr down to train.lr * train.lr_final at the last planned epoch (follows the optimizer "
                            "step count, so a resumed run continues it; a run stopped early by run.time_limit_minutes "
                            "ends before the bottom).", choices=("constant", "cosine"))
    lr_final: float = knob(0.0, "'cosine': the final learning rate as a fraction of train.lr.", ge=0.0, le=1.0)
    max_grad_norm: float = knob(1.0, "Gradient clipping norm (0 disables).", ge=0.0)
    grad_accum: int = knob(1, "Micro-batches accumulated per optimizer step.", ge=1)
    beta: float = knob(0.04, "KL weight to the reference policy (GenEval/OCR: 0.04, PickScore: 0.01).", ge=0.0)
    ref_guidance: float = knob(0.0, "Guidance scale of the reference policy in the KL (needs train.beta > 0; "
                               "a config that sets it otherwise is refused): "
                               "0 = the rollouts' own sample.guidance_scale, so the KL is zero before the first update "
                               "(the paper). A scale > 1 with CFG-free rollouts makes the reference the base model as "
                               "guidance would sample it: the KL then pulls the unguided policy toward the guided base "
                               "on the policy's own states while the clipped term follows the reward. With objective "
                               "'awm' the KL is taken at the renoised final samples, so it distils guidance at every "
                               "sigma of train.awm_sigma. Costs two reference forwards per trained step (or renoising) instead of one.",
                               ge=0.0)
    kl_weighting: str = knob("step", "How the KL to the reference weighs the trained steps: 'step' = the exact Gaussian KL "
                             "of each step's transition (late, low-noise steps weigh up to 100x more: their std is small); "
                             "'velocity' = the mean squared difference of the two velocities, every step weighed alike "
                             "(a beta about 50x smaller gives the same average size on the shipped grid).",
                             choices=("step", "velocity"))
    clip_range: float = knob(1e-4, "PPO clip range of the importance ratio; must match the log-prob reduction.", gt=0.0)
    logprob_reduce: str = knob("mean", "Reduction of per-element log-probs: 'mean' (reference code) or 'sum'.", choices=("mean", "sum"))
    adv_clip: float = knob(5.0, "Advantages are clipped to [-adv_clip, adv_clip].", gt=0.0)
    global_std: bool = knob(False, "Normalise advantages by the whole batch's std instead of each group's.")
    shuffle_advantages: bool = knob(False, "Control run: permute each epoch's advantages at random across its images, so "
                                    "the updates keep their size and statistics but carry no reward information. "
                                    "Compare with the real run to tell the reward's signal from the update noise.")
    timestep_fraction: float = knob(0.99, "Fraction of steps trained; the last, near-deterministic step is dropped.", gt=0.0, le=1.0)
    trainable: list = knob([], "Which denoiser weights are trained: [] = all of them (or every LoRA adapter), else only "
                          "those whose parameter name contains one of these strings, the rest kept at the base's values "
                          "(a name no parameter contains is refused). On the SD3 architecture the text path is "
                          "[\"context\", \"add_\", \"text_embedder\", \"norm1.linear\"]: the text embedders, the text "
                          "stream's attention and feed-forward, and the conditioning's modulation of both streams.")
    lora_rank: int = knob(0, "LoRA rank (0 = full fine-tuning with a frozen reference copy). Paper: 32.", ge=0)
    lora_alpha: float = knob(64.0, "LoRA alpha (paper: 64).", gt=0.0)
    ema_decay: float = knob(0.9, "EMA decay of trained weights, used for evaluation and checkpoints (0 disables).", ge=0.0, lt=1.0)
    ema_every: int = knob(1, "Optimizer steps between EMA updates.", ge=1)
    old_logprobs: str = knob("auto", "Log-probs of the sampling policy in the importance ratio: 'rollout' (the sampler's "
                             "own; exact when rollouts run the training forward's eager kernels), 'recompute' (the "
                             "training forward recomputes them for the trained steps before the epoch's first update: "
                             "one extra no-grad forward per trained step, ratio exactly 1; the largest difference from "
                             "the sampler's is logged as logprob_gap) or 'auto' (recompute when sample.compile is not "
                             "'none': a compiled rollout rounds differently, by up to 2.5e-3 in the ratio in bf16 on an "
                             "H100, beyond ratio_tol and the clip range).", choices=("auto", "rollout", "recompute"))
    ratio_tol: float = knob(1e-3, "On-policy check: at the first inner step |ratio - 1| must stay below this.", gt=0.0)
    objective: str = knob("grpo", "Policy loss: 'grpo' (the clipped surrogate on the SDE window's log-probs, as in the "
                          "paper) or 'awm' (advantage-weighted matching: the same group-relative advantages weight the "
                          "pretraining flow-matching loss of each final sample, renoised at sigma drawn from "
                          "train.awm_sigma; samples above their group's mean are pulled in, those below pushed away; no "
                          "log-probs, ratio or clipping; the prompt-conditional velocity is fitted whatever "
                          "sample.guidance_scale the rollouts use; train.beta then weighs the squared velocity gap "
                          "to the reference, guided by train.ref_guidance when that is set).",
                          choices=("grpo", "awm"))
    awm_sigma: list = knob([0.6, 1.0], "'awm': the range [low, high] sigma is drawn from, uniformly (0 < low <= high <= 1); "
                           "the high-noise end is where what is drawn gets decided.")
    awm_draws: int = knob(3, "'awm': (sigma, noise) draws per image and update; each costs one training forward, as "
                          "one trained SDE step does for 'grpo'.", ge=1)
    awm_shared_noise: bool = knob(False, "'awm': a group's images share each draw's sigma and noise, so the parts of their "
                                  "gradients that do not depend on the image cancel in the advantage-weighted sum "
                                  "(a group's advantages sum to zero) instead of adding noise.")


@dataclass
class RewardConfig:
    name: str = knob("shapes", "Reward: 'shapes' (GenEval-style partial credit), 'shapes_strict' (1 only when fully "
                     "correct), 'shapes_exact' (partial credit scaled down by extra objects, which GenEval does not "
                     "charge for), 'shapes_soft' ('shapes_exact' with each shape's label a probability from the "
                     "detector's template correlations, so drawing the named shape distinctly pays), or "
                     "'brightness' (test reward).",
                     choices=("shapes", "shapes_strict", "shapes_exact", "shapes_soft", "brightness"))
    workers: int = knob(0, "Processes the shapes rewards (and evaluation) score images in; the policy is idle "
                        "meanwhile, so every core can score. 0: one per CPU core, at most 8; 1: in the trainer's "
                        "own process. Scores are the same whatever the number.", ge=0)
    prompts: str = knob("train", "Prompt set rollouts draw from: 'train', 'test', either limited to task types ('train:position', 'train:colors,counting'), or a path to a text file (one prompt per line).")


@dataclass
class EvalConfig:
    num_steps: int = knob(40, "ODE steps for evaluation (the model's usual count; SD3.5: 40).", ge=1)
    guidance_scale: float = knob(4.5, "Classifier-free guidance for evaluation.", ge=1.0)
    images_per_prompt: int = knob(4, "Images per held-out prompt.", ge=1)
    min_images_per_task: int = knob(0, "At least this many images per task type: a task with few prompts gets more "
                                    "images per prompt (ceil(min / prompts)), so that its accuracy, which weighs a "
                                    "sixth of the overall mean, is not decided by a handful of images. 0: "
                                    "images_per_prompt everywhere (GenEval's protocol).", ge=0)
    batch_size: int = knob(128, "Images per forward in evaluation.", ge=1)
    every: int = knob(10, "Evaluate every this many epochs during training (0: only before and after).", ge=0)
    prompts: str = knob("test", "Prompt set: 'test', 'train', either limited to task types ('test:position'), or a path to a text file.")
    seed: int = knob(1234, "Seed of the evaluation noise (fixed so evaluations compare).", ge=0)
    grid_size: int = knob(24, "Samples in the saved PNG grid.", ge=0)


@dataclass
class PretrainConfig:
    steps: int = knob(3000, "Optimizer steps of flow-matching pretraining.", ge=1)
    vae_steps: int = knob(1000, "Latent models only: optimizer steps that train the autoencoder (reconstruction "
                          "loss on rendered scenes) before flow matching starts.", ge=1)
    vae_lr: float = knob(2e-3, "Latent models only: AdamW peak learning rate of the autoencoder stage.", gt=0.0)
    batch_size: int = knob(64, "Rendered scenes per step.", ge=1)
    lr: float = knob(1e-3, "AdamW peak learning rate (cosine decay after warmup).", gt=0.0)
    warmup: int = knob(100, "Linear warmup steps.", ge=0)
    cfg_dropout: float = knob(0.1, "Probability a caption is replaced by the empty prompt (enables CFG).", ge=0.0, le=1.0)
    ema_decay: float = knob(0.999, "EMA decay of the saved weights.", ge=0.0, lt=1.0)
    seed: int = knob(0, "Seed for initialisation, scenes and noise.", ge=0)
    caption_noise: float = knob(0.0, "Probability that a scene is drawn wrong for its caption, as web alt-text "
                                "often is; which errors: caption_errors (with 'all' and 'omit' single objects and "
                                "colours stay exact). 0: exact captions.",
                                ge=0.0, le=1.0)
    caption_errors: str = knob("all", "Which errors caption_noise makes: 'all' (an object left out, a count off, a "
                               "relation reversed, two colours swapped, in equal measure by task) or 'omit' (only "
                               "an object the caption names left out: a base that neglects objects, as "
                               "SD-class models do) or 'unrelated' (the scene is one drawn for another prompt, "
                               "of any task type, single objects and colours included: alt-text that does not "
                               "describe its image; a base that follows its prompt weakly without guidance).",
                               choices=("all", "omit", "unrelated"))
    prompt_strength: float = knob(1.0, "Below 1 (needs init): instead of flow matching on the scenes' captions, "
                                  "distil the init model into one that follows its prompt this much without "
                                  "guidance: its conditional velocity is trained toward v_u + s (v_c - v_u) of the "
                                  "frozen init model (an empty prompt, toward v_u), on the scenes noised as in "
                                  "pretraining. Guidance g on the result samples as guidance s*g on the init "
                                  "model: a base strong at composition with guidance and weak without. 1: off.",
                                  gt=0.0, le=1.0)
    init: str = knob("", "Start from the model in this directory instead of a fresh one (model.* shape "
                     "settings and the autoencoder stage are then skipped). Empty: a fresh model.")
    out: str = knob("fgrpo/weights/embedded", "Where the trained weights are written.")


@dataclass
class RunConfig:
    output_dir: str = knob("runs/latest", "Directory for metrics, samples, checkpoints and the resolved config.")
    threads: int = knob(0, "torch CPU threads (0: torch's default).", ge=0)
    device: str = knob("auto", "'auto' (CUDA if available), 'cpu' or 'cuda'.", choices=("auto", "cpu", "cuda"))
    checkpoint_every: int = knob(10, "Epochs between checkpoints (0: only at the end).", ge=0)
    progress: bool = knob(True, "Show progress bars.")
    time_limit_minutes: float = knob(0.0, "Wall-clock budget of one `fgrpo train` call from the command's start, evaluations "
                                     "included (0: none). An epoch starts only if it, any evaluation due after it, the "
                                     "final evaluation and 10 s for writing the outputs are expected to fit, judged by the last epoch's and the last "
                                     "evaluation's durations; otherwise the run stops early, evaluates, checkpoints "
                                     "and exports as at its end, and `--resume` continues it. At least one epoch "
                                     "runs. A limited run stops at an epoch that depends on the machine's speed.",
                                     ge=0.0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list}


# ---------------------------------------------------------------------------- validation


def _check_value(where: str, f: dataclasses.Field, value: Any) -> Any:
    ftype = _TYPES[f.type]  # annotations are strings under `from __future__ import annotations`
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif ftype is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        allowed = ", ".join(repr(c) for c in m["choices"])
        raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {allowed}")
    for op, test, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                           ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = m.get(op)
        if bound is not None and not test(value, bound):
            raise ConfigError(f"{where}: {value!r} is out of range; must be {word} {bound}")
    return value


def _build_section(name: str, values: dict, source: str):
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(f"{source}: unknown key '{name}.{key}'; allowed keys in [{name}]: {allowed}")
        kwargs[key] = _check_value(f"{source}: {name}.{key}", fields[key], value)
    return cls(**kwargs)


def resolve_device(cfg: Config):
    """`run.device` as a torch.device: CUDA for "auto" or "cuda" when a GPU is present, else the CPU."""
    import torch

    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device("cuda" if cfg.run.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _semantic_checks(cfg: Config, source: str) -> None:
    s, t = cfg.sample, cfg.train
    if s.sde_window and s.sde_window > s.num_steps - 1:
        raise ConfigError(f"{source}: sample.sde_window={s.sde_window} must be below sample.num_steps={s.num_steps}")
    wr = s.window_range
    if len(wr) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in wr) or not 0 <= wr[0] < wr[1]:
        raise ConfigError(f"{source}: sample.window_range must be two integers [first, last) with 0 <= first < last, got {wr!r}")
    if s.sde_window and wr[1] + s.sde_window - 1 > s.num_steps:
        raise ConfigError(f"{source}: sample.window_range {wr} + sde_window {s.sde_window} runs past sample.num_steps={s.num_steps}")
    lo_hi = t.awm_sigma
    if (len(lo_hi) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
            or not 0 < lo_hi[0] <= lo_hi[1] <= 1):
        raise ConfigError(f"{source}: train.awm_sigma must be two numbers [low, high] with 0 < low <= high <= 1, got {lo_hi!r}")
    if not all(isinstance(v, str) and v for v in t.trainable):
        raise ConfigError(f"{source}: train.trainable must be a list of non-empty strings (parts of parameter names), "
                          f"got {t.trainable!r}")
    pc = cfg.pretrain
    if pc.prompt_strength < 1 and not pc.init:
        raise ConfigError(f"{source}: pretrain.prompt_strength={pc.prompt_strength} distils an existing model; "
                          "set pretrain.init to its directory, or prompt_strength to 1")
    if pc.prompt_strength < 1 and pc.caption_noise > 0:
        raise ConfigError(f"{source}: pretrain.caption_noise has no effect with prompt_strength < 1 (the targets come "
                          "from the init model, not the captions); set one of them to its default")
    if t.ref_guidance and t.beta == 0:
        raise ConfigError(f"{source}: train.ref_guidance={t.ref_guidance} has no effect with train.beta=0; "
                          "set train.beta > 0 for the KL to the guided reference, or ref_guidance to 0")
    total = s.group_size * s.groups_per_epoch
    if total % s.batch_size:
        raise ConfigError(
            f"{source}: sample.group_size * sample.groups_per_epoch = {total} must be a multiple of sample.batch_size={s.batch_size}")
    if (total // s.batch_size) % t.grad_accum:
        raise ConfigError(f"{source}: the {total // s.batch_size} batches per epoch must be a multiple of train.grad_accum={t.grad_accum}")


def from_dict(data: dict, source: str = "<dict>") -> Config:
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; allowed sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{name}' must be a [{name}] table, got {values!r}")
        sections[name] = _build_section(name, values, source)
    cfg = Config(**sections)
    _semantic_checks(cfg, source)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse 'section.key=value'; the value is read as a TOML value, else kept as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Load a TOML config, apply `section.key=value` overrides, validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass a path such as configs/geneval.toml")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"--set {text!r}: '{section}' is not a section")
        data[section][key] = value
    return from_dict(data, source + (" (with --set)" if overrides else ""))


# ---------------------------------------------------------------------------- output


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    lines = ["# Resolved fgrpo config: every setting this run used, defaults included."]
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        lines.append(f"\n[{section.name}]")
        for f in dataclasses.fields(obj):
            lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}  # {f.metadata['doc']}")
    return "\n".join(lines) + "\n"


def save(cfg: Config, directory: str | os.PathLike) -> Path:
    """Write the resolved config as `config.toml` in `directory` (atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.toml"
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(to_toml(cfg))
    os.replace(tmp, path)
    return path


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
