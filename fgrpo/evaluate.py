"""Held-out evaluation: ODE samples at the evaluation step count, GenEval-style scores, a PNG grid.

The overall strict accuracy is GenEval's: the mean of the per-task accuracies, so
each of the six task types weighs the same however many prompts it has.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgrpo.config import UserError
from fgrpo.models.base import FlowModel
from fgrpo.rewards import group_diversity, quality_proxies
from fgrpo.sampling import sample_ode
from fgrpo.tasks import shapes


def _split_spec(spec: str) -> tuple[str, list[str]] | None:
    """('train' | 'test', task types) for 'train', 'test', 'train:position', 'test:two_object,counting'; None for a file."""
    split, sep, tasks = spec.partition(":")
    if split not in ("train", "test"):
        return None
    wanted = [t.strip() for t in tasks.split(",") if t.strip()] if sep else []
    if sep and not wanted:
        raise UserError(f"prompt set {spec!r} names no task type after ':'; e.g. '{split}:position'")
    unknown = [t for t in wanted if t not in shapes.TASKS]
    if unknown:
        raise UserError(f"prompt set {spec!r}: unknown task type {', '.join(unknown)}; choose from {', '.join(shapes.TASKS)}")
    return split, wanted


def resolve_prompts(spec: str, shapes_only: bool = False) -> list[str]:
    """'train' / 'test' name the shipped sets, 'train:position' (or 'test:colors,counting') their
    prompts of the named task types; anything else is a text file, one prompt per line.

    With `shapes_only` every prompt must follow the shapes grammar (the detector scores it).
    """
    shipped = _split_spec(spec)
    if shipped is not None:
        split, wanted = shipped
        prompts = shapes.load_prompts(split)
        if wanted:
            prompts = [p for p in prompts if shapes.parse_prompt(p).task in wanted]
        return prompts
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; use 'train', 'test', 'train:TASK' or a path to a text file")
    lines = [(i + 1, line.strip()) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} holds no prompts")
    if shapes_only:
        for lineno, prompt in lines:
            try:
                shapes.parse_prompt(prompt)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: {e}") from None
    return [p for _, p in lines]


def prompt_set_name(spec: str) -> str:
    """How a table names the evaluation prompts: 'held-out' for the test set, else which set it is."""
    shipped = _split_spec(spec)
    if shipped is not None:
        split, wanted = shipped
        name = "held-out" if split == "test" else "train-prompt"
        return f"{name} {'+'.join(wanted)}" if wanted else name
    return f"{Path(spec).name} prompt"


def accuracy_table(tasks: list[str], strict: np.ndarray, reward: np.ndarray, extra: np.ndarray | None = None) -> dict:
    """Per-task and overall (mean over tasks, as GenEval) strict accuracy and reward.

    With `extra` (shapes detected beyond those the prompt asks for, per image) it also gives the
    exact accuracy: strict and nothing extra. GenEval's rules, like the strict accuracy, let extra
    objects pass outside counting prompts; a policy that learns to scatter shapes raises the strict
    accuracy but not the exact one, so a gap opening between the two is reward hacking in plain view.

    `strict_se` is the standard error of the overall accuracy: each task's binomial variance over
    its images (with the Agresti-Coull adjustment, (k + 2) / (n + 4), so that a task at 0% or 100%
    of a few images still counts as uncertain), combined as for a mean of independent tasks. It
    treats the images as independent draws; two evaluations differ beyond noise at about 3x it.
    """
    per_task = {}
    for t in shapes.TASKS:
        m = np.array([x == t for x in tasks])
        if m.any():
            per_task[t] = {"strict_accuracy": float(strict[m].mean()), "reward": float(reward[m].mean()),
                           "n": int(m.sum())}
            if extra is not None:
                per_task[t]["exact_accuracy"] = float((strict[m] & (extra[m] == 0)).mean())
    overall = float(np.mean([v["strict_accuracy"] for v in per_task.values()]))
    var = 0.0
    for v in per_task.values():
        p = (v["strict_accuracy"] * v["n"] + 2) / (v["n"] + 4)
        var += p * (1 - p) / v["n"]
    se = float(np.sqrt(var) / len(per_task)) if per_task else 0.0
    table = {"strict_accuracy": overall, "strict_se": se, "reward": float(reward.mean()), "per_task": per_task}
    if extra is not None:
        table["exact_accuracy"] = float(np.mean([v["exact_accuracy"] for v in per_task.values()])) if per_task else 0.0
    return table


def format_table(metrics: dict, title: str = "") -> str:
    lines = [title] if title else []
    exact = "exact_accuracy" in metrics

    def ex(v: dict) -> str:
        return f"{v['exact_accuracy']:>8.3f}" if exact else ""

    lines.append(f"{'task':<15}{'strict acc':>11}{'reward':>9}{'images':>8}" + (f"{'exact':>8}" if exact else ""))
    for t, v in metrics["per_task"].items():
        lines.append(f"{t:<15}{v['strict_accuracy']:>11.3f}{v['reward']:>9.3f}{v['n']:>8d}{ex(v)}")
    se = f"  (standard error {metrics['strict_se']:.3f})" if "strict_se" in metrics else ""
    tail = f"{'':>8}{ex(metrics)}{se}" if exact else se
    lines.append(f"{'overall':<15}{metrics['strict_accuracy']:>11.3f}{metrics['reward']:>9.3f}{tail}")
    if exact:
        lines.append("exact: strict with no shapes beyond those asked for (GenEval's rules let extras pass)")
    if "diversity" in metrics:
        lines.append(f"diversity within prompt {metrics['diversity']:.3f}, high-freq energy {metrics['hf_energy']:.4f}")
    return "\n".join(lines)


def save_grid(images: np.ndarray, prompts: list[str], path: str | Path, cols: int = 6, scale: int = 4) -> None:
    """Images (N, H, W, 3) uint8 upscaled, each captioned with its prompt, tiled into one PNG."""
    n = len(images)
    if n == 0:
        return
    h, w = images.shape[1] * scale, images.shape[2] * scale
    cap = 22
    cell_w = max(w, 150)
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * (h + cap)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + (cell_w - w) // 2, r * (h + cap)
        grid.paste(Image.fromarray(images[i]).resize((w, h), Image.NEAREST), (x0, y0))
        text = prompts[i] if len(prompts[i]) <= 26 else prompts[i][:25] + "…"
        draw.text((c * cell_w + 3, y0 + h + 4), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def grid_subset(prompts: list[str], count: int) -> list[int]:
    """Indices of up to `count` prompts taken round-robin over the task types, for readable grids."""
    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(shapes.parse_prompt(p).task, []).append(i)
    order: list[int] = []
    for k in range(len(prompts)):
        order += [idx[k] for idx in by_task.values() if k < len(idx)]
        if len(order) >= count:
            break
    return order[:count]


def images_per_prompt(prompts: list[str], per_prompt: int, min_per_task: int = 0) -> list[int]:
    """How many images each prompt gets: `per_prompt`, raised for the prompts of a task type with
    fewer than `min_per_task` images so that the task reaches it (ceil(min_per_task / its prompts))."""
    tasks = [shapes.parse_prompt(p).task for p in prompts]
    count = {t: tasks.count(t) for t in set(tasks)}
    return [max(per_prompt, -(-min_per_task // count[t])) for t in tasks]


def evaluate(model: FlowModel, eval_cfg, shift: float, out_dir: str | Path | None = None,
             progress: bool = True, tag: str = "eval", engine=None, workers: int = 1) -> dict:
    """Sample every evaluation prompt `images_per_prompt` times (more for task types with few prompts,
    `min_images_per_task`) and score the images.

    `engine` (a `fgrpo.engine.RolloutEngine`) runs the ODE sampling; default: eager. `workers` > 1
    scores in that many processes (`reward.workers`).
    """
    base = resolve_prompts(eval_cfg.prompts, shapes_only=True)
    counts = images_per_prompt(base, eval_cfg.images_per_prompt, eval_cfg.min_images_per_task)
    prompts = [p for p, k in zip(base, counts) for _ in range(k)]
    starts = np.cumsum([0] + counts[:-1]).tolist()  # each prompt's first image
    t0 = time.time()
    x = sample_ode(model, prompts, num_steps=eval_cfg.num_steps, guidance_scale=eval_cfg.guidance_scale,
                   shift=shift, seed=eval_cfg.seed, batch_size=eval_cfg.batch_size, progress=progress, desc=tag, engine=engine)
    images = shapes.images_to_uint8(x)
    scores = shapes.score_images(prompts, images, workers)
    metrics = accuracy_table(scores["task"], scores["strict"], scores["reward"], scores["extra"])
    # Every prompt weighs the same, however many images it has.
    metrics["diversity"] = float(np.mean([group_diversity(images[s:s + k], k) for s, k in zip(starts, counts)]))
    metrics.update(quality_proxies(images))
    metrics["seconds"] = time.time() - t0
    metrics["num_images"] = len(prompts)
    metrics["prompts"] = eval_cfg.prompts
    metrics["num_steps"] = eval_cfg.num_steps
    if out_dir is not None and eval_cfg.grid_size:
        # First image of each prompt, spread across tasks.
        pick = [starts[i] for i in grid_subset([prompts[i] for i in starts], eval_cfg.grid_size)]
        save_grid(images[pick], [prompts[i] for i in pick], Path(out_dir) / f"{tag}_grid.png")
    return metrics


def write_metrics(metrics: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(path)

