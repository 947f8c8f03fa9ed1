"""Train with `fgrpo train` and keep the live weights after every optimizer step, so weight averages
other than the run's own EMA (longer decays, a uniform average of the last epochs) can be evaluated
afterwards without training again (docs/geneval_investigation.md, "Weight averaging, the policy term's
share, and runs past 25 epochs").

    python docs/sweep/snapshots.py train OUTDIR CONFIG [--set section.key=value ...]
    python docs/sweep/snapshots.py average OUTDIR DECAY [LAST_STEP]
    python docs/sweep/snapshots.py uniform OUTDIR FIRST_STEP LAST_STEP

`train` writes OUTDIR/snapshots/step_NNNN.pt (the trained parameters, fp32) beside the run's usual outputs.
`average` writes OUTDIR/avg_ema{DECAY}_{LAST_STEP}/: an EMA with that per-step decay, started from the base
and read after LAST_STEP (default the last); with decay 0.9 it is the run's own EMA (the shipped
`train.ema_decay`). `uniform` writes OUTDIR/avg_uni_{FIRST}_{LAST}/, the mean of those steps' weights
(steps count from 1). Both are model directories for `fgrpo eval CONFIG --set model.path=DIR`.
Run from the repository root.
"""
import sys
from pathlib import Path

import torch

from fgrpo import cli
from fgrpo import config as C
from fgrpo import train as T
from fgrpo.models import load_model


def snapshots(out: Path) -> list[Path]:
    return sorted((out / "snapshots").glob("step_*.pt"))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("train", "average", "uniform"):
        print(__doc__)
        return 2
    mode, out = argv[0], Path(argv[1])
    if mode == "train":
        snap = out / "snapshots"
        update = T.Policy.update_ema
        count = {"n": len(snapshots(out)) if "--resume" in argv else 0}  # a resumed run numbers on

        def update_and_keep(self, decay):
            update(self, decay)
            count["n"] += 1
            snap.mkdir(parents=True, exist_ok=True)
            torch.save({n: p.detach().clone() for n, p in self.params.items()}, snap / f"step_{count['n']:04d}.pt")

        T.Policy.update_ema = update_and_keep
        # Last, so a snapshot follows every optimizer step whatever the overrides say.
        return cli.main(["train", argv[2], "--set", f"run.output_dir={out}", *argv[3:], "--set", "train.ema_every=1"])
    files = snapshots(out)
    cfg = C.load(out / "config.toml", [])
    model = load_model(cfg.model, torch.device("cpu"))
    params = dict(model.denoiser.named_parameters())
    if mode == "average":
        decay = float(argv[2])
        last = int(argv[3]) if len(argv) > 3 else len(files)
        avg = {n: p.detach().clone() for n, p in params.items()}
        for f in files[:last]:
            w = torch.load(f)
            for n in avg:
                avg[n].lerp_(w[n], 1 - decay)
        dest = out / f"avg_ema{decay:g}_{last}"
    else:
        first, last = int(argv[2]), int(argv[3])
        sel = files[first - 1:last]
        avg = {n: torch.zeros_like(p) for n, p in params.items()}
        for f in sel:
            w = torch.load(f)
            for n in avg:
                avg[n] += w[n] / len(sel)
        dest = out / f"avg_uni_{first}_{last}"
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(avg[n])
    model.save_pretrained(dest)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
