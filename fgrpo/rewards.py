"""Rewards, and the signals logged beside them to catch reward hacking.

A reward is a function (prompts, images uint8 (N, H, W, 3)) -> dict with "reward"
(float, N) and optionally "strict" (bool, N). Diversity within groups and cheap
image-quality proxies are logged next to the reward: a reward that rises while
diversity collapses or high-frequency energy climbs is being gamed.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from fgrpo.tasks import shapes

RewardFn = Callable[[list[str], np.ndarray], dict]


def shapes_reward(prompts: list[str], images: np.ndarray, workers: int = 1) -> dict:
    """GenEval-style continuous partial credit (training signal), with the strict result."""
    s = shapes.score_images(prompts, images, workers)
    return {"reward": s["reward"].astype(np.float32), "strict": s["strict"]}


def shapes_strict_reward(prompts: list[str], images: np.ndarray, workers: int = 1) -> dict:
    s = shapes.score_images(prompts, images, workers)
    return {"reward": s["strict"].astype(np.float32), "strict": s["strict"]}


def _spare_factor(prompts: list[str], extra: np.ndarray) -> np.ndarray:
    """(n / (n + extra))^2 per image: n the objects its prompt asks for, extra the shapes beyond them."""
    n = np.array([shapes.named_count(p) for p in prompts], np.float32)
    return (n / (n + extra)) ** 2


def shapes_exact_reward(prompts: list[str], images: np.ndarray, workers: int = 1) -> dict:
    """Partial credit scaled by (n / (n + extra))^2: n the objects the prompt asks for, extra the
    shapes detected beyond them. GenEval's rules (and `shapes`) charge nothing for extra objects
    outside counting prompts, so a policy can raise them by scattering shapes. Squared, the factor
    makes extra objects never pay: both shapes of a two-object prompt plus one extra earn 0.44, one
    shape alone 0.5 (unsquared it would be 0.67). The strict result is GenEval's, unchanged."""
    s = shapes.score_images(prompts, images, workers)
    return {"reward": (s["reward"] * _spare_factor(prompts, s["extra"])).astype(np.float32), "strict": s["strict"]}


def shapes_soft_reward(prompts: list[str], images: np.ndarray, workers: int = 1) -> dict:
    """`shapes_exact` with soft shape labels: each component's shape is the softmax of its template
    correlations, so a blob that is only just more a square than a circle earns little for "square"
    and a distinct square earns full credit (`fgrpo.tasks.shapes.soft_score`). The hard labels of small
    shapes flip on near-equal correlations; this credit moves smoothly with the image instead. Extra
    shapes are charged as in `shapes_exact`; the strict result is GenEval's, unchanged."""
    s = shapes.score_images(prompts, images, workers)
    return {"reward": (s["soft"] * _spare_factor(prompts, s["extra"])).astype(np.float32), "strict": s["strict"]}


def brightness_reward(prompts: list[str], images: np.ndarray) -> dict:
    """Mean brightness in [0, 1]: a trivially learnable reward for tests and smoke runs."""
    return {"reward": images.reshape(len(images), -1).mean(axis=1).astype(np.float32) / 255.0}


REWARDS: dict[str, RewardFn] = {
    "shapes": shapes_reward,
    "shapes_strict": shapes_strict_reward,
    "shapes_exact": shapes_exact_reward,
    "shapes_soft": shapes_soft_reward,
    "brightness": brightness_reward,
}


def get_reward(name: str, workers: int = 1) -> RewardFn:
    """The reward called `name`; the shapes rewards score in `workers` processes (`reward.workers`)."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")
    fn = REWARDS[name]
    return functools.partial(fn, workers=workers) if name.startswith("shapes") and workers > 1 else fn


def reward_workers(setting: int) -> int:
    """`reward.workers`: 0 picks one process per CPU core this process may run on, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return setting if setting > 0 else min(8, cores)


def group_diversity(images: np.ndarray, group_size: int) -> float:
    """Mean pairwise RMS distance (pixels in [0, 1]) between images of the same group."""
    n = len(images) // group_size * group_size
    if group_size < 2 or n == 0:
        return 0.0
    x = images[:n].reshape(n // group_size, group_size, -1).astype(np.float32) / 255.0
    d2 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).mean(-1)  # (groups, G, G)
    iu = np.triu_indices(group_size, 1)
    return float(np.sqrt(d2[:, iu[0], iu[1]]).mean())


def quality_proxies(images: np.ndarray) -> dict:
    """Cheap image statistics: high-frequency energy (noise, grid artefacts) and foreground fraction."""
    x = images.astype(np.float32) / 255.0
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    blur = sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return {"hf_energy": float(np.abs(x - blur).mean()), "fg_fraction": float((images.max(-1) > 90).mean())}


# How far an evaluation's image statistics may move from the run's first evaluation before
# `quality_drift` flags it: (metric, lowest ratio, highest ratio). The exact accuracy (strict with no
# extra shapes) falls when a policy learns to scatter objects, even small ones the other proxies miss.
DRIFT_LIMITS = (("diversity", 0.8, None), ("hf_energy", None, 1.5), ("fg_fraction", 0.67, 1.5),
                ("exact_accuracy", 0.8, None))


def quality_drift(base: dict, now: dict) -> list[str]:
    """The image-quality proxies of `now` that left DRIFT_LIMITS relative to `base`, as readable phrases.

    A reward that rises while these move (more speckle, many more or fewer foreground pixels,
    samples of a prompt converging) is the usual sign of reward hacking; the run goes on, the
    trainer prints the phrases so the user can look at the sample grids.
    """
    out = []
    for key, lo, hi in DRIFT_LIMITS:
        b, n = base.get(key), now.get(key)
        if b is None or n is None or b <= 0:
            continue
        r = n / b
        if (lo is not None and r < lo) or (hi is not None and r > hi):
            out.append(f"{key} {n:.4g} is {r:.2f}x its first evaluation's {b:.4g}")
    return out
