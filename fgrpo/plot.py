"""A small line plot drawn with pillow (no plotting library needed): accuracy against wall-clock time."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, *, xlabel: str, ylabel: str,
              title: str = "", ylim: tuple[float, float] = (0.0, 1.0), size=(640, 400)) -> None:
    """Plot named (x, y) series as lines with markers into a PNG."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = ylim

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        _, py = px(x0, y)
        d.line([left, py, w - right, py], fill=(225, 225, 225))
        d.text((8, py - 6), f"{y:.1f}", fill="black")
        x = x0 + (x1 - x0) * i / 5
        qx, _ = px(x, y0)
        d.text((qx - 10, h - bottom + 6), f"{x:.0f}", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
              (23, 190, 207), (227, 119, 194), (127, 127, 127)]
    for k, (name, pts) in enumerate(series.items()):
        c = colors[k % len(colors)]
        p = [px(x, y) for x, y in pts]
        if len(p) > 1:
            d.line(p, fill=c, width=2)
        for q in p:
            d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=c)
        d.text((left + 8, top + 6 + 14 * k), name, fill=c)
    d.text((w // 2 - 60, h - 22), xlabel, fill="black")
    d.text((8, 8), f"{title}   ({ylabel})" if title else ylabel, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def accuracy_plot(evals: list[dict], path: str | Path) -> None:
    """Evaluation strict accuracy (overall, its exact variant and per task) against training wall-clock seconds."""
    from fgrpo.evaluate import prompt_set_name
    series = {"overall": [(e["wall"], e["strict_accuracy"]) for e in evals]}
    if all("exact_accuracy" in e for e in evals):  # evaluations from before it was recorded lack it
        series["overall, exact"] = [(e["wall"], e["exact_accuracy"]) for e in evals]
    for task in evals[0]["per_task"]:
        series[task] = [(e["wall"], e["per_task"][task]["strict_accuracy"]) for e in evals if task in e["per_task"]]
    line_plot(series, path, xlabel="training wall-clock (s)", ylabel=f"{prompt_set_name(evals[0].get('prompts', 'test'))} strict accuracy",
              title="Flow-GRPO on the shapes task")
