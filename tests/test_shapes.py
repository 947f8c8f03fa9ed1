"""The shapes task: prompt grammar, splits, renderer, detector and GenEval-style scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgrpo.tasks import shapes as S
from fgrpo.tasks.shapes import Detection, ObjectSpec, PromptSpec

EXPECTED_COUNTS = {"single_object": 4, "two_object": 12, "counting": 12, "colors": 20, "position": 48,
                   "color_attr": 240}


def corrupt(images: np.ndarray, seed: int, std: float = 20.0) -> np.ndarray:
    """Gaussian noise then one 3x3 box blur: a stand-in for a model's imperfect samples."""
    rng = np.random.default_rng(seed)
    x = np.clip(images.astype(np.float32) + rng.normal(0, std, images.shape), 0, 255)
    h, w = images.shape[1:3]
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    x = sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9
    return np.clip(x.round(), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("task", S.TASKS)
def test_all_prompts_round_trip(task):
    prompts = S.all_prompts(task)
    assert len(prompts) == EXPECTED_COUNTS[task]
    assert len(set(prompts)) == len(prompts)
    assert prompts == S.all_prompts(task)
    for p in prompts:
        spec = S.parse_prompt(p)
        assert spec.task == task
        assert S.format_prompt(spec) == p


def test_parse_examples():
    assert S.parse_prompt("three crosses") == PromptSpec("counting", (ObjectSpec("cross", count=3),))
    assert S.parse_prompt("a red square and a blue circle") == PromptSpec(
        "color_attr", (ObjectSpec("square", "red"), ObjectSpec("circle", "blue")))
    assert S.parse_prompt("a cross below a triangle") == PromptSpec(
        "position", (ObjectSpec("cross"), ObjectSpec("triangle")), relation="below")
    assert S.format_prompt(PromptSpec("colors", (ObjectSpec("triangle", "white"),))) == "a white triangle"


@pytest.mark.parametrize("prompt", ["a purple circle", "five circles", "a circle left of a circle", "",
                                    "a red circle and a red square", "a circle and a circle", "three crosss",
                                    "two circle", "a hexagon", "a circle next to a square", "A circle."])
def test_bad_prompts_raise(prompt):
    with pytest.raises(ValueError) as err:
        S.parse_prompt(prompt)
    msg = str(err.value)
    assert repr(prompt) in msg and "\n" not in msg


def test_format_rejects_invalid_specs():
    for spec in [PromptSpec("counting", (ObjectSpec("circle", count=5),)),
                 PromptSpec("colors", (ObjectSpec("circle"),)),
                 PromptSpec("position", (ObjectSpec("circle"), ObjectSpec("square"))),
                 PromptSpec("two_object", (ObjectSpec("circle"),)),
                 PromptSpec("dancing", (ObjectSpec("circle"),))]:
        with pytest.raises(ValueError):
            S.format_prompt(spec)


# ----------------------------------------------------------------------------- splits

def test_splits():
    train, test = S.make_splits()
    assert (train, test) == S.make_splits(seed=0)
    assert S.make_splits(seed=1) != (train, test)
    assert not set(train) & set(test)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    every = {p for t in S.TASKS for p in S.all_prompts(t)}
    assert set(train) | set(test) <= every
    for split in (train, test):
        assert {S.parse_prompt(p).task for p in split} == set(S.TASKS)
    words = {w for p in train for o in S.parse_prompt(p).objects for w in (o.shape, o.color)}
    assert set(S.SHAPES) | set(S.COLORS) <= words
    n_attr = [sum(S.parse_prompt(p).task == "color_attr" for p in split) for split in (train, test)]
    assert n_attr[0] <= 200 and n_attr[1] <= 40


def test_shipped_files_match_make_splits():
    train, test = S.make_splits()
    assert S.load_prompts("train") == train
    assert S.load_prompts("test") == test
    with pytest.raises(ValueError):
        S.load_prompts("val")


# ----------------------------------------------------------------------------- rendering

def test_render_basics():
    img = S.render("a red circle", np.random.default_rng(0))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[0, 0] == 0).all()
    red = img[..., 0].astype(int)
    assert (red > 200).sum() > 20
    assert ((red > 30) & (red < 200)).any()  # anti-aliased rim
    assert (img == S.render("a red circle", np.random.default_rng(0))).all()
    spec = S.parse_prompt("four squares")
    assert S.render(spec, np.random.default_rng(3), size=48).shape == (48, 48, 3)
    batch = S.render_batch(["a cross", "two triangles"], seed=5, size=24)
    assert batch.shape == (2, 24, 24, 3)
    assert (batch == S.render_batch(["a cross", "two triangles"], seed=5, size=24)).all()


def test_shapes_without_a_colour_render_in_the_default_colour_but_any_colour_scores():
    rng = np.random.default_rng(0)
    for prompt in ["a circle", "three squares", "a cross left of a triangle"]:
        img = S.render(prompt, rng)
        dets = S.detect(img)
        assert dets and {d.color for d in dets} == {S.DEFAULT_COLOR}, prompt
    # The prompt leaves the colour open, so a red circle is as right as a white one.
    red = S.render("a red circle", rng)
    assert S.score("a circle", S.detect(red), size=32) == (True, 1.0)


def test_render_never_hangs_on_tiny_images():
    rng = np.random.default_rng(0)
    for prompt in ["four crosses", "a circle above a square", "a red cross and a blue triangle"]:
        assert S.render(prompt, rng, size=8).shape == (8, 8, 3)


# ----------------------------------------------------------------------------- detector + scorer

@pytest.fixture(scope="module")
def rendered():
    prompts = S.load_prompts("test") * 3
    images = S.render_batch(prompts, seed=123)
    return prompts, images


def _accuracy(prompts, images):
    res = S.score_images(prompts, images)
    tasks = np.array(res["task"])
    per_task = {t: float(res["strict"][tasks == t].mean()) for t in S.TASKS if t in tasks}
    return float(res["strict"].mean()), per_task, res


def test_scores_of_clean_renders(rendered):
    prompts, images = rendered
    overall, per_task, res = _accuracy(prompts, images)
    assert overall >= 0.98, per_task
    assert min(per_task.values()) >= 0.95, per_task
    assert res["strict"].dtype == bool and res["reward"].dtype == np.float32
    assert res["task"] == [S.parse_prompt(p).task for p in prompts]
    assert ((res["reward"] >= 0) & (res["reward"] <= 1)).all()
    assert (res["reward"][res["strict"]] == 1).all()


def test_scores_of_noisy_blurred_renders(rendered):
    prompts, images = rendered
    overall, per_task, _ = _accuracy(prompts, corrupt(images, seed=0))
    assert overall >= 0.93, per_task


def test_scale_invariance():
    prompts = [p for p in S.load_prompts("test") if S.parse_prompt(p).task in ("counting", "color_attr")][:12]
    overall, per_task, _ = _accuracy(prompts, S.render_batch(prompts, seed=9, size=64))
    assert overall >= 0.9, per_task


def test_detections_of_a_known_scene():
    img = S.render("a green cross and a white triangle", np.random.default_rng(4))
    dets = sorted(S.detect(img), key=lambda d: d.shape)
    assert [(d.shape, d.color) for d in dets] == [("cross", "green"), ("triangle", "white")]
    for d in dets:
        assert 0 < d.cx < 32 and 0 < d.cy < 32 and d.area > 10


@pytest.mark.parametrize("relation", S.RELATIONS)
def test_detected_centroids_agree_with_relation(relation):
    rng = np.random.default_rng(7)
    for _ in range(3):
        dets = S.detect(S.render(f"a circle {relation} a square", rng))
        (a,), (b,) = [d for d in dets if d.shape == "circle"], [d for d in dets if d.shape == "square"]
        dx, dy = a.cx - b.cx, a.cy - b.cy
        along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
        assert along >= 0.25 * 32 and abs(across) < along


def test_wrong_count_is_penalised():
    rng = np.random.default_rng(11)
    img = S.render("three circles", rng)
    assert S.score("three circles", S.detect(img), 32) == (True, 1.0)
    assert S.score("two circles", S.detect(img), 32) == (False, 0.5)


def test_wrong_relation_is_not_strict():
    rng = np.random.default_rng(12)
    for _ in range(3):
        dets = S.detect(S.render("a circle left of a square", rng))
        assert S.score("a circle left of a square", dets, 32)[0]
        strict, partial = S.score("a circle right of a square", dets, 32)
        assert not strict and partial == pytest.approx(2 / 3)


def test_black_image_scores_zero():
    prompts = [S.all_prompts(t)[0] for t in S.TASKS]
    black = np.zeros((len(prompts), 32, 32, 3), np.uint8)
    res = S.score_images(prompts, black)
    assert not res["strict"].any() and (res["reward"] == 0).all()
    assert all(S.detect(img) == [] for img in corrupt(black, seed=1))


def test_no_detections_in_pure_noise():
    noise = corrupt(np.zeros((20, 32, 32, 3), np.uint8), seed=2, std=30)
    assert all(S.detect(img) == [] for img in noise)


def _det(shape, color="red", cx=16.0, cy=16.0):
    return Detection(shape, color, cx, cy, 40)


def test_partial_credit_rules():
    circle_r, square_b = _det("circle", "red", 8, 16), _det("square", "blue", 24, 16)
    assert S.score("a circle", [square_b], 32) == (False, 0.0)
    assert S.score("a circle and a square", [circle_r], 32) == (False, 0.5)
    assert S.score("a circle and a square", [circle_r, square_b], 32) == (True, 1.0)
    assert S.score("four circles", [circle_r], 32) == (False, 0.25)
    assert S.score("two circles", [circle_r] * 5, 32) == (False, 0.0)
    assert S.score("a red circle", [circle_r], 32) == (True, 1.0)
    assert S.score("a blue circle", [circle_r], 32) == (False, 0.5)
    assert S.score("a blue circle", [square_b], 32) == (False, 0.0)
    assert S.score("a circle left of a square", [circle_r, square_b], 32) == (True, 1.0)
    assert S.score("a circle above a square", [circle_r, square_b], 32)[1] == pytest.approx(2 / 3)
    assert S.score("a circle left of a square", [circle_r], 32)[1] == pytest.approx(1 / 3)
    # Centres closer than the margin (0.1 * size) do not count as a relation.
    assert not S.score("a circle left of a square", [_det("circle", cx=15), _det("square", cx=17)], 32)[0]
    assert S.score("a red circle and a blue square", [circle_r, square_b], 32) == (True, 1.0)
    assert S.score("a green circle and a blue square", [circle_r, square_b], 32) == (False, 0.75)
    assert S.score("a blue circle and a red triangle", [circle_r], 32) == (False, 0.25)


# ----------------------------------------------------------------------------- conversions

def test_tensor_conversions_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    x = S.uint8_to_tensor(images)
    assert x.shape == (2, 3, 8, 6) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert (S.images_to_uint8(x) == images).all()
    out = S.images_to_uint8(torch.tensor([[[[-3.0, 0.0, 5.0]]] * 3]))
    assert out.shape == (1, 1, 3, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("errors", S.CAPTION_ERRORS)
@pytest.mark.parametrize("task", S.TASKS)
def test_miscaptioned_scenes_fail_compositional_prompts_and_keep_simple_ones(task, errors):
    rng = np.random.default_rng(3)
    prompts = S.all_prompts(task)[:12]
    specs = [S.miscaption(S.parse_prompt(p), rng, errors) for p in prompts]
    strict = S.score_images(prompts, S.render_batch(specs, seed=7))["strict"]
    if task in ("single_object", "colors"):
        assert strict.all()  # alt-text gets these right: the scene is the prompt's
    else:
        assert not strict.any()  # every miscaptioned scene is wrong for its caption
    # The error is a near miss, not an unrelated scene: the shapes stay those of the prompt.
    for p, s in zip(prompts, specs):
        assert {o.shape for o in s.objects} <= {o.shape for o in S.parse_prompt(p).objects}
        if errors == "omit":  # exactly one named object is missing, and no relation is left to get wrong
            named = S.parse_prompt(p).objects
            drawn = sum(o.count for o in s.objects)
            assert drawn == sum(o.count for o in named) - (task not in ("single_object", "colors"))
            assert s.relation is None


def test_unknown_caption_errors_are_rejected():
    with pytest.raises(ValueError, match="omit"):
        S.miscaption(S.parse_prompt("two circles"), np.random.default_rng(0), "swap")
