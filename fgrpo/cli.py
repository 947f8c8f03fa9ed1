"""The `fgrpo` command line: pretrain, eval, sample, train.

User mistakes (bad config, missing files, bad prompts) are reported here, at the
edge, as one line on stderr with exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fgrpo import config as C

STARTED = time.time()  # the command's start, for run.time_limit_minutes


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    if required:
        p.add_argument("config", help="TOML run config, e.g. configs/geneval.toml")
    else:
        p.add_argument("--config", default=None, help="TOML run config (defaults if omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def _setup(cfg: C.Config):
    import torch

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return C.resolve_device(cfg)


def cmd_pretrain(args) -> None:
    from fgrpo.pretrain import pretrain

    cfg = C.load(args.config, args.overrides)
    _setup(cfg)
    summary = pretrain(cfg, progress=cfg.run.progress)
    if "vae_steps" in summary:
        print(f"autoencoder: {summary['vae_steps']} steps in {summary['vae_seconds']:.0f}s, loss {summary['vae_loss']:.4f}, "
              f"strict accuracy of its reconstructions {summary['vae_reconstruction_strict']:.3f}")
    if "prompt_strength" in summary:
        print(f"distilled {summary['init']} to prompt strength {summary['prompt_strength']:g}: guidance g on the "
              f"result samples as guidance {summary['prompt_strength']:g}*g on it")
    print(f"pretrained {summary['steps']} steps in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f}; "
          f"weights in {summary['out']}")


def cmd_eval(args) -> None:
    from fgrpo.engine import RolloutEngine
    from fgrpo.evaluate import evaluate, format_table, prompt_set_name, resolve_prompts, write_metrics
    from fgrpo.models import load_model
    from fgrpo.rewards import reward_workers

    cfg = C.load(args.config, args.overrides)
    device = _setup(cfg)
    out = Path(args.out or Path(cfg.run.output_dir) / "eval")
    resolve_prompts(cfg.eval.prompts, shapes_only=True)  # a bad prompt file fails before the model loads
    model = load_model(cfg.model, device).eval()
    C.save(cfg, out)
    metrics = evaluate(model, cfg.eval, cfg.sample.shift, out_dir=out, progress=cfg.run.progress,
                       engine=RolloutEngine.from_config(model, cfg.sample), workers=reward_workers(cfg.reward.workers))
    write_metrics(metrics, out / "metrics.json")
    print(format_table(metrics, f"{prompt_set_name(cfg.eval.prompts)} strict accuracy ({metrics['num_images']} images, "
                                f"{cfg.eval.num_steps} ODE steps, {metrics['seconds']:.0f}s)"))
    print(f"wrote {out / 'metrics.json'} and {out / 'eval_grid.png'}")


def cmd_sample(args) -> None:
    from PIL import Image

    from fgrpo.engine import RolloutEngine
    from fgrpo.models import load_model
    from fgrpo.sampling import sample_ode
    from fgrpo.tasks.shapes import images_to_uint8

    cfg = C.load(args.config, args.overrides)
    device = _setup(cfg)
    model = load_model(cfg.model, device).eval()
    steps = args.steps or cfg.eval.num_steps
    x = sample_ode(model, [args.prompt] * args.num, num_steps=steps, guidance_scale=cfg.eval.guidance_scale,
                   shift=cfg.sample.shift, seed=args.seed, batch_size=cfg.eval.batch_size,
                   engine=RolloutEngine.from_config(model, cfg.sample))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "_".join(args.prompt.split())[:60] or "unconditional"
    for i, img in enumerate(images_to_uint8(x)):
        Image.fromarray(img).resize((img.shape[1] * args.scale, img.shape[0] * args.scale), Image.NEAREST).save(
            out / f"{slug}_{i:03d}.png")
    print(f"wrote {args.num} images to {out}/")


def cmd_train(args) -> None:
    from fgrpo.train import train

    cfg = C.load(args.config, args.overrides)
    _setup(cfg)
    train(cfg, resume=args.resume, overwrite=args.overwrite, started=STARTED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgrpo", description="Flow-GRPO for flow-matching text-to-image models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="online RL (Flow-GRPO) of a flow model against a reward")
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run whose outputs are in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even if run.output_dir holds an earlier run's checkpoint (it is replaced)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out GenEval-style evaluation with the ODE sampler")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: <run.output_dir>/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="write images for a prompt")
    _add_config_args(p, required=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--num", type=int, default=4, help="number of images")
    p.add_argument("--steps", type=int, default=0, help="ODE steps (default: eval.num_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the saved PNGs")
    p.add_argument("--out", default="samples")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("pretrain", help="train the embedded model from scratch by flow matching")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (C.UserError, FileNotFoundError) as e:
        print(f"fgrpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fgrpo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
