"""The shapes task: GenEval in miniature.

Prompts ask for coloured shapes on a black background ("a red circle", "three crosses",
"a square left of a triangle", ...) in GenEval's six task types. `render` draws a
correct scene for a prompt (pretraining data, and ground truth for the detector),
`detect` finds the shapes in an image by colour segmentation and template matching,
and `score` applies GenEval's rules to the detections: a strict pass/fail and a
partial credit in [0, 1] that serves as the RL reward.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 250),
    "yellow": (240, 220, 30),
    "white": (240, 240, 240),
}
DEFAULT_COLOR = "white"  # the colour of shapes whose prompt names none
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # cross -> crosses
_SINGULAR = {p: s for s, p in PLURALS.items()}
_NUMBER_OF = {w: n for n, w in NUMBERS.items()}


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str | None = None
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    task: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # position: objects[0] <relation> objects[1]


@dataclass
class Detection:
    shape: str
    color: str
    cx: float  # pixels, x grows rightward
    cy: float  # pixels, y grows downward
    area: int


# ----------------------------------------------------------------------------- prompts

GRAMMAR = ("'a {shape}' | 'a {shape} and a {shape}' | '{two|three|four} {shape}s' | 'a {color} {shape}' | "
           "'a {shape} {left of|right of|above|below} a {shape}' | 'a {color} {shape} and a {color} {shape}' "
           f"with shape in {'/'.join(SHAPES)}, color in {'/'.join(COLORS)}, paired shapes and colours distinct")

_S, _C = f"({'|'.join(SHAPES)})", f"({'|'.join(COLORS)})"
_N, _P, _R = f"({'|'.join(NUMBERS.values())})", f"({'|'.join(PLURALS.values())})", f"({'|'.join(RELATIONS)})"
_PATTERNS = {
    "single_object": re.compile(f"a {_S}"),
    "two_object": re.compile(f"a {_S} and a {_S}"),
    "counting": re.compile(f"{_N} {_P}"),
    "colors": re.compile(f"a {_C} {_S}"),
    "position": re.compile(f"a {_S} {_R} a {_S}"),
    "color_attr": re.compile(f"a {_C} {_S} and a {_C} {_S}"),
}


def _check(spec: PromptSpec) -> str | None:
    """Why `spec` is not a prompt of the grammar, or None if it is one."""
    if spec.task not in TASKS:
        return f"unknown task {spec.task!r}"
    objs, rel = spec.objects, spec.relation
    n_objects = 1 if spec.task in ("single_object", "counting", "colors") else 2
    if len(objs) != n_objects:
        return f"{spec.task} needs {n_objects} object(s)"
    coloured = spec.task in ("colors", "color_attr")
    for o in objs:
        if o.shape not in SHAPES:
            return f"unknown shape {o.shape!r}"
        if (o.color is not None) != coloured or (coloured and o.color not in COLORS):
            return f"bad colour {o.color!r} for {spec.task}"
        if not (o.count in NUMBERS if spec.task == "counting" else o.count == 1):
            return f"bad count {o.count} for {spec.task}"
    if (rel in RELATIONS) != (spec.task == "position"):
        return f"bad relation {rel!r} for {spec.task}"
    if n_objects == 2 and objs[0].shape == objs[1].shape:
        return "the two shapes must differ"
    if spec.task == "color_attr" and objs[0].color == objs[1].color:
        return "the two colours must differ"
    return None


def parse_prompt(prompt: str) -> PromptSpec:
    """The structured form of a shapes prompt; ValueError if it is not in the grammar."""
    text = " ".join(prompt.split()) if isinstance(prompt, str) else None
    for task, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text) if text else None
        if m is None:
            continue
        g = m.groups()
        if task == "counting":
            spec = PromptSpec(task, (ObjectSpec(_SINGULAR[g[1]], count=_NUMBER_OF[g[0]]),))
        elif task == "position":
            spec = PromptSpec(task, (ObjectSpec(g[0]), ObjectSpec(g[2])), relation=g[1])
        elif task in ("colors", "color_attr"):
            spec = PromptSpec(task, tuple(ObjectSpec(s, c) for c, s in zip(g[::2], g[1::2])))
        else:
            spec = PromptSpec(task, tuple(ObjectSpec(s) for s in g))
        problem = _check(spec)
        if problem is None:
            return spec
        raise ValueError(f"shapes prompt {prompt!r} is invalid ({problem}); grammar: {GRAMMAR}")
    raise ValueError(f"shapes prompt {prompt!r} does not parse; grammar: {GRAMMAR}")


def format_prompt(spec: PromptSpec) -> str:
    """The prompt text of `spec` (inverse of parse_prompt)."""
    problem = _check(spec)
    if problem is not None:
        raise ValueError(f"invalid prompt spec {spec!r}: {problem}")
    o = spec.objects
    if spec.task == "counting":
        return f"{NUMBERS[o[0].count]} {PLURALS[o[0].shape]}"
    if spec.task == "position":
        return f"a {o[0].shape} {spec.relation} a {o[1].shape}"
    return " and ".join(f"a {ob.color} {ob.shape}" if ob.color else f"a {ob.shape}" for ob in o)


def all_prompts(task: str) -> list[str]:
    """Every prompt of one task type, in a fixed order."""
    pairs = [(ObjectSpec(a), ObjectSpec(b)) for a in SHAPES for b in SHAPES if a != b]
    colour_pairs = [(c, d) for c in COLORS for d in COLORS if c != d]
    if task == "single_object":
        specs = [PromptSpec(task, (ObjectSpec(s),)) for s in SHAPES]
    elif task == "two_object":
        specs = [PromptSpec(task, p) for p in pairs]
    elif task == "counting":
        specs = [PromptSpec(task, (ObjectSpec(s, count=n),)) for n in NUMBERS for s in SHAPES]
    elif task == "colors":
        specs = [PromptSpec(task, (ObjectSpec(s, c),)) for c in COLORS for s in SHAPES]
    elif task == "position":
        specs = [PromptSpec(task, p, r) for p in pairs for r in RELATIONS]
    elif task == "color_attr":
        specs = [PromptSpec(task, (ObjectSpec(a.shape, c), ObjectSpec(b.shape, d)))
                 for a, b in pairs for c, d in colour_pairs]
    else:
        raise ValueError(f"unknown shapes task {task!r}; expected one of {', '.join(TASKS)}")
    return [format_prompt(spec) for spec in specs]


def _words(prompt: str) -> set[str]:
    """The shapes and colours a prompt names."""
    return {w for o in parse_prompt(prompt).objects for w in (o.shape, o.color) if w}


def make_splits(seed: int = 0, test_fraction: float = 0.3) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) prompt lists, split per task type; deterministic for a seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for task in TASKS:
        prompts = all_prompts(task)
        prompts = [prompts[i] for i in rng.permutation(len(prompts))]
        n_test = min(max(1, round(test_fraction * len(prompts))), len(prompts) - 1)
        n_train = len(prompts) - n_test
        if task == "color_attr":  # 240 prompts: cap both sides so the shipped files stay small
            n_test = min(n_test, 40)
            n_train = min(len(prompts) - n_test, 200)
        test += prompts[:n_test]
        train += prompts[n_test:n_test + n_train]
    # A word the policy never saw in training could never be learned, only guessed.
    for word in (*SHAPES, *COLORS):
        if not any(word in _words(p) for p in train):
            moved = next(p for p in test if word in _words(p))
            test.remove(moved)
            train.append(moved)
    return train, test


def load_prompts(split: str) -> list[str]:
    """The shipped 'train' or 'test' prompt list (make_splits() with its defaults)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    text = resources.files(__package__).joinpath("data").joinpath(f"shapes_{split}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- rendering

_SUPERSAMPLE = 4
_RELATION_AXIS = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


def _layout(n: int, size: int, rng: np.random.Generator, relation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Centres (n, 2) as (x, y) and side lengths (n,) of non-overlapping boxes, in pixels."""
    lo, hi = (0.22, 0.34) if n <= 2 else (0.18, 0.26)
    gap, margin = 0.08 * size, 0.03 * size
    for attempt in range(8):
        sides = rng.uniform(lo, hi, n) * size * 0.9 ** attempt
        half = (sides / 2 + margin)[None, :, None]
        # 256 candidate layouts at once: rejection sampling without a Python loop per try.
        cand = half + rng.random((256, n, 2)) * np.maximum(size - 2 * half, 0)
        d = np.abs(cand[:, :, None, :] - cand[:, None, :, :])
        sep = (sides[:, None] + sides[None, :]) / 2 + gap
        ok = ((d >= sep[None, :, :, None]).any(-1) | np.eye(n, dtype=bool)).all((1, 2))
        if relation is not None:
            axis, sign = _RELATION_AXIS[relation]
            delta = cand[:, 1] - cand[:, 0]
            along, across = sign * delta[:, axis], np.abs(delta[:, 1 - axis])
            ok &= (along >= 0.3 * size) & (across <= 0.6 * along)
        if ok.any():
            return cand[np.argmax(ok)], sides
    # Fallback that always fits: a grid (or the two ends of the relation axis).
    k = math.ceil(math.sqrt(n))
    sides = np.full(n, max(1.0, min(hi * size, size / k - gap)))
    if relation is not None:
        axis, sign = _RELATION_AXIS[relation]
        cand = np.full((2, 2), 0.5 * size)
        cand[:, axis] = (0.5 - 0.25 * sign) * size, (0.5 + 0.25 * sign) * size
        return cand, np.minimum(sides, 0.3 * size)
    return np.array([((i % k + 0.5) * size / k, (i // k + 0.5) * size / k) for i in range(n)]), sides


def _draw_scene(objects: list[tuple[str, tuple[int, int, int]]], centres: np.ndarray, sides: np.ndarray,
                size: int) -> np.ndarray:
    """Rasterise at 4x and box-downsample so that edges come out anti-aliased."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k))
    draw = ImageDraw.Draw(canvas)
    for (shape, color), (cx, cy), s in zip(objects, centres, sides):
        # Image coordinates (pixel i spans [i, i+1)) to PIL's, where pixel i is centred on i.
        cx, cy, r = cx * k - 0.5, cy * k - 0.5, s * k / 2
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
        else:  # cross: a plus sign with arms a third of its size wide
            draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=color)
            draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=color)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX))


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


CAPTION_ERRORS = ("all", "omit")


def miscaption(spec: PromptSpec, rng: np.random.Generator, errors: str = "all") -> PromptSpec:
    """A scene a sloppy caption of `spec` might describe: the error a web caption makes.

    `errors="all"`: two objects lose one, a count is off, a relation is reversed, two colours are
    swapped. `errors="omit"`: the caption names an object the scene leaves out (two objects lose
    one, a count is one short, a position or colour-binding scene keeps one of its two objects), the
    error behind text-to-image models' object neglect. Single objects and single colours come back
    unchanged either way: alt-text gets those right, and SD-class base models are strong at exactly
    these GenEval tasks.
    """
    if errors not in CAPTION_ERRORS:
        raise ValueError(f"errors must be one of {CAPTION_ERRORS}, got {errors!r}")
    o = spec.objects
    if spec.task in ("single_object", "colors"):
        return spec
    if errors == "omit" and spec.task == "counting":
        return PromptSpec("counting", (ObjectSpec(o[0].shape, o[0].color, o[0].count - 1),))
    if errors == "omit" or spec.task == "two_object":  # one of the two named objects is left out
        return PromptSpec("single_object", (o[int(rng.integers(2))],))
    if spec.task == "counting":
        other = [n for n in NUMBERS if n != o[0].count]
        return PromptSpec("counting", (ObjectSpec(o[0].shape, count=int(rng.choice(other))),))
    if spec.task == "position":
        return PromptSpec("position", o, _OPPOSITE[spec.relation])
    if spec.task == "color_attr":
        return PromptSpec("color_attr", (ObjectSpec(o[0].shape, o[1].color), ObjectSpec(o[1].shape, o[0].color)))
    return spec


def render(prompt_or_spec: str | PromptSpec, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A correct scene for the prompt: uint8 (size, size, 3), shapes on black."""
    spec = parse_prompt(prompt_or_spec) if isinstance(prompt_or_spec, str) else prompt_or_spec
    # A shape whose colour the prompt leaves open is drawn in DEFAULT_COLOR. Random colours
    # would make the model's best guess at high noise the palette's mean, a dim grey below
    # the detector's foreground threshold, and a small model then draws nothing at all.
    objects = [(o.shape, COLORS[o.color or DEFAULT_COLOR]) for o in spec.objects for _ in range(o.count)]
    centres, sides = _layout(len(objects), size, rng, spec.relation)
    return _draw_scene(objects, centres, sides, size)


def render_batch(prompts: list[str | PromptSpec], seed: int, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3) scenes for the prompts (or specs), from one generator seeded by `seed`."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(prompts), size, size, 3), np.uint8)
    for i, p in enumerate(prompts):
        out[i] = render(p, rng, size)
    return out


# ----------------------------------------------------------------------------- detection

FOREGROUND_THRESHOLD = 90  # max channel; noise (std ~20) on black stays well below it
_PALETTE = np.array(list(COLORS.values()), np.float32)
_COLOR_NAMES = tuple(COLORS)
_FEATURE = 12  # side of the resampled grid
_WINDOW = 2.3  # its half-width in radii of gyration; a triangle's apex lies 2.1 out
# A component counts as a shape only if it correlates this well with some template, like a
# detector's confidence threshold. Rendered shapes, noisy or blurred, score >= 0.95; the blobs
# of a noise image (what an untrained model draws) mostly score 0.5-0.8 and must not earn credit.
MATCH_THRESHOLD = 0.9


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels (-1 off the mask) by min-label propagation (images are tiny)."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        p = np.pad(lab, 1, constant_values=none)
        new = lab
        for dy in range(3):
            for dx in range(3):
                new = np.minimum(new, p[dy:dy + h, dx:dx + w])
        new = np.where(mask, new, none)
        # Pointer jumping (adopt the label's own label) makes long shapes converge fast.
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _segment(image: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(palette index, mask, soft coverage of that colour) for every large enough component."""
    img = image.astype(np.float32)
    h, w = img.shape[:2]
    fg = img.max(-1) > FOREGROUND_THRESHOLD
    # Distance to each colour's ray from black, not to the colour itself: anti-aliased
    # and blurred edges are the colour blended with black and must keep its name.
    alpha = np.clip(img @ _PALETTE.T / (_PALETTE ** 2).sum(1), 0, 1)
    resid = ((img[..., None, :] - alpha[..., None] * _PALETTE) ** 2).sum(-1)
    nearest = resid.argmin(-1)
    min_area = max(5, 0.006 * h * w)
    out = []
    for c in np.unique(nearest[fg]):
        labels = _label(fg & (nearest == c))
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        for i in ids[counts >= min_area]:
            mask = labels == i
            # The soft mask takes in the dim rim below the threshold (a 1-px dilation),
            # but not a neighbour of another colour that the dilation touches.
            p = np.pad(mask, 1)
            rim = np.logical_or.reduce([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
            out.append((int(c), mask, np.where(rim & ~(fg & (nearest != c)), alpha[..., c], 0)))
    return out


def _moments(a: np.ndarray) -> tuple[float, float, float]:
    """Centroid (x, y) and radius of gyration of a soft mask, in pixels."""
    h, w = a.shape
    ys, xs = np.mgrid[:h, :w] + 0.5
    m = a.sum() + 1e-6
    cx, cy = (a * xs).sum() / m, (a * ys).sum() / m
    return cx, cy, math.sqrt((a * ((xs - cx) ** 2 + (ys - cy) ** 2)).sum() / m)


def _feature(a: np.ndarray, cx: float, cy: float, sigma: float) -> np.ndarray:
    """The soft mask resampled on a grid scaled by its radius of gyration, normalised for correlation.

    Scaling by moments rather than cropping to the thresholded bounding box keeps the
    feature stable when a tiny shape moves by a fraction of a pixel."""
    u = np.linspace(-1, 1, _FEATURE) * _WINDOW * sigma
    x, y = np.meshgrid(cx + u - 0.5, cy + u - 0.5)  # pixel i is centred on i + 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    p = np.pad(a, 1)
    h, w = a.shape

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:  # zero outside the image
        return p[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]

    top = (1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)
    bottom = (1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)
    f = ((1 - fy) * top + fy * bottom).ravel()
    f = f - f.mean()
    return f / (np.linalg.norm(f) + 1e-6)


def _box_blur(image: np.ndarray) -> np.ndarray:
    p = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return (sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9).round().astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Features of each shape drawn as render draws it, over sizes, sub-pixel shifts and degradations.

    Model samples are noisy and soft, so the templates include noisy and blurred
    copies; matching takes the nearest template, so each copy only adds coverage."""
    rng = np.random.default_rng(12345)
    feats, labels = [], []
    for label, shape in enumerate(SHAPES):
        for side in np.geomspace(4, 18, 16):
            for noise, blurs in ((0, 0), (0, 1), (20, 1), (20, 2)):
                for _ in range(3):
                    img = _draw_scene([(shape, COLORS["white"])], [12 + rng.random(2)], [side], 24)
                    img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
                    for _ in range(blurs):
                        img = _box_blur(img)
                    soft = max(_segment(img), key=lambda t: t[1].sum())[2]
                    feats.append(_feature(soft, *_moments(soft)))
                    labels.append(label)
    return np.stack(feats), np.array(labels)


@dataclass
class Component:
    """A coloured component with its best template correlation for each shape (in SHAPES order)."""
    color: str
    cx: float
    cy: float
    area: int
    match: np.ndarray  # (len(SHAPES),)


def components(image: np.ndarray) -> list[Component]:
    """Every large enough coloured component of a uint8 (H, W, 3) image, matched against each shape."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect needs an (H, W, 3) image, got shape {image.shape}")
    feats, labels = _templates()
    out = []
    for c, mask, soft in _segment(image):
        cx, cy, sigma = _moments(soft)
        sims = feats @ _feature(soft, cx, cy, sigma)
        match = np.array([sims[labels == s].max() for s in range(len(SHAPES))])
        out.append(Component(_COLOR_NAMES[c], float(cx), float(cy), int(mask.sum()), match))
    return out


def detections(comps: list[Component]) -> list[Detection]:
    """The components that are shapes (best match at least MATCH_THRESHOLD), named by their best match."""
    out = []
    for k in comps:
        best = int(np.argmax(k.match))  # the first of equal matches, in SHAPES order
        if k.match[best] >= MATCH_THRESHOLD:
            out.append(Detection(SHAPES[best], k.color, k.cx, k.cy, k.area))
    return out


def detect(image: np.ndarray) -> list[Detection]:
    """The coloured shapes in a uint8 (H, W, 3) image."""
    return detections(components(image))


# ----------------------------------------------------------------------------- scoring

def _holds(a: Detection, b: Detection, relation: str, m: float) -> bool:
    return {"left of": a.cx < b.cx - m, "right of": a.cx > b.cx + m,
            "above": a.cy < b.cy - m, "below": a.cy > b.cy + m}[relation]


def score(prompt: str, detections: list[Detection], size: int) -> tuple[bool, float]:
    """GenEval's rules: (strict pass, partial credit in [0, 1]) of the detections for the prompt."""
    spec = parse_prompt(prompt)
    o = spec.objects

    def found(shape: str, color: str | None = None) -> list[Detection]:
        return [d for d in detections if d.shape == shape and (color is None or d.color == color)]

    if spec.task == "single_object":
        ok = bool(found(o[0].shape))
        return ok, float(ok)
    if spec.task == "two_object":
        present = [bool(found(x.shape)) for x in o]
        return all(present), sum(present) / 2
    if spec.task == "counting":
        n, k = o[0].count, len(found(o[0].shape))
        return k == n, max(0.0, 1 - abs(k - n) / n)
    if spec.task == "colors":
        ok = bool(found(o[0].shape, o[0].color))
        return ok, 1.0 if ok else 0.5 if found(o[0].shape) else 0.0
    if spec.task == "position":
        a, b = found(o[0].shape), found(o[1].shape)
        rel = any(_holds(x, y, spec.relation, 0.1 * size) for x in a for y in b)
        return rel, (bool(a) + bool(b) + rel) / 3
    # color_attr: half the credit per object, half of that for the shape in any colour
    right = [bool(found(x.shape, x.color)) for x in o]
    partial = sum(0.5 if r else 0.25 if found(x.shape) else 0.0 for r, x in zip(right, o))
    return all(right), partial


# Soft scoring: the same clauses as score(), with each component's shape a probability instead of a
# hard label. A small or blurred shape matches every template almost equally (0.96 vs 0.97), so the
# hard label of such a blob is close to a coin flip; the soft one pays for drawing the named shape
# distinctly, which moves smoothly with the image.
SOFT_TEMPERATURE = 0.01  # softmax temperature over the template correlations
SOFT_VALID_WIDTH = 0.01  # width of the sigmoid around MATCH_THRESHOLD that says "this is a shape"
SOFT_RELATION_WIDTH = 1.0  # pixels: width of the sigmoid around a relation's margin


def shape_probabilities(comp: Component) -> np.ndarray:
    """(len(SHAPES),) probability that the component is each shape (summing to at most 1: the rest is
    'not a shape')."""
    z = (comp.match - comp.match.max()) / SOFT_TEMPERATURE
    p = np.exp(z) / np.exp(z).sum()
    valid = 1.0 / (1.0 + math.exp(-(comp.match.max() - MATCH_THRESHOLD) / SOFT_VALID_WIDTH))
    return valid * p


def _soft_relation(a: Component, b: Component, relation: str, m: float) -> float:
    d = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[relation]
    return 1.0 / (1.0 + math.exp(-(d - m) / SOFT_RELATION_WIDTH))


def _best_pair(credit: np.ndarray) -> float:
    """Largest credit[0, i] + credit[1, j] over distinct components i != j, either allowed to be none."""
    if credit.shape[1] == 0:
        return 0.0
    best = max(credit[0].max(), credit[1].max())
    for i in range(credit.shape[1]):
        for j in range(credit.shape[1]):
            if i != j:
                best = max(best, credit[0, i] + credit[1, j])
    return float(best)


def soft_score(prompt: str, comps: list[Component], size: int) -> float:
    """score()'s partial credit in [0, 1] with soft shape labels (see shape_probabilities)."""
    spec = parse_prompt(prompt)
    o = spec.objects
    idx = {s: i for i, s in enumerate(SHAPES)}
    q = np.array([shape_probabilities(k) for k in comps]).reshape(len(comps), len(SHAPES))

    def of(x: ObjectSpec, colored: bool = False) -> np.ndarray:
        """Per component: the probability it is x, halved if colours count and it has another colour."""
        c = q[:, idx[x.shape]]
        if colored:
            c = c * np.array([1.0 if k.color == x.color else 0.5 for k in comps])
        return c

    if not comps:
        return 0.0
    if spec.task == "single_object":
        return float(of(o[0]).max())
    if spec.task == "two_object":
        return _best_pair(np.stack([of(o[0]), of(o[1])])) / 2
    if spec.task == "counting":
        n = o[0].count
        return max(0.0, 1 - abs(float(of(o[0]).sum()) - n) / n)
    if spec.task == "colors":
        return float(of(o[0], colored=True).max())
    if spec.task == "position":
        a, b = of(o[0]), of(o[1])
        rel = max((a[i] * b[j] * _soft_relation(comps[i], comps[j], spec.relation, 0.1 * size)
                   for i in range(len(comps)) for j in range(len(comps)) if i != j), default=0.0)
        return float(a.max() + b.max() + rel) / 3
    # color_attr: half the credit per object, half of that for the shape in another colour
    return _best_pair(np.stack([of(o[0], True), of(o[1], True)])) / 2


def named_count(prompt: str) -> int:
    """How many objects the prompt asks for (a count's number, else the objects named)."""
    return sum(o.count for o in parse_prompt(prompt).objects)


def score_images(prompts: list[str], images: np.ndarray, workers: int = 1) -> dict:
    """Scores of uint8 (N, H, W, 3) images: {"strict": bool (N,), "reward": float32 (N,) partial credit,
    "soft": float32 (N,) the same with soft shape labels (soft_score), "task": [str],
    "extra": int (N,) detected shapes beyond the number the prompt asks for}.

    With `workers` > 1 the images are scored in that many worker processes (started on first use
    and kept for later calls); each image's scores are the same either way."""
    images = np.asarray(images)
    if images.ndim != 4 or len(prompts) != len(images):
        raise ValueError(f"need one (H, W, 3) image per prompt, got {len(prompts)} prompts and images {images.shape}")
    if workers > 1 and len(prompts) >= 4 * workers:
        bounds = np.linspace(0, len(prompts), 4 * workers + 1).astype(int)  # a few chunks a worker evens out the load
        parts = list(_pool(workers).map(score_images, [prompts[a:b] for a, b in zip(bounds, bounds[1:])],
                                        [images[a:b] for a, b in zip(bounds, bounds[1:])]))
        return {k: sum((q[k] for q in parts), []) if k == "task" else np.concatenate([q[k] for q in parts])
                for k in parts[0]}
    strict = np.zeros(len(prompts), bool)
    reward = np.zeros(len(prompts), np.float32)
    soft = np.zeros(len(prompts), np.float32)
    extra = np.zeros(len(prompts), np.int64)
    for i, (p, img) in enumerate(zip(prompts, images)):
        comps = components(img)
        found = detections(comps)
        strict[i], reward[i] = score(p, found, size=img.shape[1])
        soft[i] = soft_score(p, comps, size=img.shape[1])
        extra[i] = max(0, len(found) - named_count(p))
    return {"strict": strict, "reward": reward, "soft": soft, "task": [parse_prompt(p).task for p in prompts],
            "extra": extra}


@functools.lru_cache(maxsize=None)
def _pool(workers: int):
    """A process pool for score_images; its workers build the detector's templates as they start.

    On Linux the workers are forked: they run numpy only, never torch, so the parent's torch threads
    cannot deadlock them, and a script that calls the trainer needs no `if __name__ == "__main__":`
    guard (spawned workers import the caller's script again). Elsewhere they are spawned, as Python
    does by default there, and such a script needs the guard."""
    import atexit
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_templates)
    atexit.register(pool.shutdown)  # before interpreter teardown, which would leave the pool's thread half-closed
    return pool


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model images, float (N, 3, H, W) in [-1, 1], as uint8 (N, H, W, 3)."""
    x = x.detach().cpu().float().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def uint8_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as float32 (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1).contiguous()
