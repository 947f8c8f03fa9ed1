"""`fgrpo.train` with split SDE noise (docs/geneval_investigation.md, "Its own correct images, block-mean
exploration, an anchor, and the rollout sampler"). Run from the repository root:

    python docs/probes/split_noise.py sample.noise_block=4 run.output_dir=runs/split4

Each SDE step's noise is the block means (`sample.noise_block` x `sample.noise_block` tiles, per channel) of
an image's own white noise plus the rest of a white noise shared by the whole batch. The sum is still
N(0, I) element by element, so the images stay on the sampler's distribution (unlike `sample.noise_block`
alone, which makes every block's noise constant); with the probe's defaults (`sample.group_size = 32` =
`sample.batch_size`, 16 prompts per epoch, `sample.shared_group_noise = true`) the images of a group
differ only by the block means of their SDE noise. The log-prob is the block means' density, as
`sample.noise_block` already computes it. Arguments are config overrides (no `--set`).
"""
import sys

import torch

import fgrpo.sde as S
import fgrpo.train as T
from fgrpo import config as C

DEFAULTS = ["sample.group_size=32", "sample.groups_per_epoch=16", "sample.batch_size=32",
            "sample.shared_group_noise=true", "sample.noise_block=4"]


def split_noise(shape, block, *, generator=None, device=None):
    n, c, h, w = shape
    own = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    shared = torch.randn((1, c, h, w), generator=generator, device=device, dtype=torch.float32).expand(shape)

    def block_means(z):
        m = z.reshape(n, c, h // block, block, w // block, block).mean(dim=(3, 5), keepdim=True)
        return m.expand(n, c, h // block, block, w // block, block).reshape(n, c, h, w)

    return block_means(own) + shared - block_means(shared)


if __name__ == "__main__":
    try:
        cfg = C.load("configs/geneval.toml", DEFAULTS + sys.argv[1:])
    except C.ConfigError as e:
        sys.exit(f"{e}\nusage: python docs/probes/split_noise.py [section.key=value ...]  (config overrides, no --set)")
    if cfg.sample.group_size != cfg.sample.batch_size or cfg.sample.noise_block < 2:
        sys.exit("split_noise.py: sample.group_size must equal sample.batch_size (the shared noise is per batch) "
                 "and sample.noise_block must be >= 2")
    S.block_noise = split_noise  # the block step of fgrpo.sde draws its noise through this name
    T.train(cfg, progress=False, overwrite=True)
