"""`fgrpo train` with the KL term only on the first N epochs: from epoch N + 1 on `train.beta` is 0, so the
clipped policy term alone (the reward) steers the updates and the reference forwards are skipped
(docs/geneval_investigation.md, "Weight averaging, the policy term's share, and runs past 25 epochs").

    python docs/sweep/kl_first_epochs.py N CONFIG [--set section.key=value ...] [--overwrite]

Run from the repository root. Not resumable across the switch (a resumed run starts with the config's beta).
"""
import sys

from fgrpo import cli
from fgrpo import train as T

if len(sys.argv) < 3:
    sys.exit(__doc__)
n_kl = int(sys.argv[1])
trained_steps = T.trained_steps
epochs = {"n": 0}


def switching_trained_steps(sc, tc, rng):
    epochs["n"] += 1  # called once at the start of every epoch
    if epochs["n"] > n_kl and tc.beta:
        print(f"epoch {epochs['n']}: train.beta {tc.beta:g} -> 0 (KL only on the first {n_kl} epochs)", flush=True)
        tc.beta = 0.0
    return trained_steps(sc, tc, rng)


T.trained_steps = switching_trained_steps
sys.exit(cli.main(["train"] + sys.argv[2:]))
