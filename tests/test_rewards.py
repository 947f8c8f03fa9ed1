"""Rewards, the reward-hacking guards (diversity within groups, image-quality proxies, their drift) and the evaluation's standard error."""

from __future__ import annotations

import numpy as np
import pytest

from fgrpo.rewards import get_reward, group_diversity, quality_drift, quality_proxies
from fgrpo.tasks import shapes as S


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    prompts = [p for p in S.load_prompts("train")[:4] for _ in range(4)]
    return S.render_batch(prompts, seed=3)


def speckle(images: np.ndarray, seed: int = 0, amount: float = 60.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float32) + rng.normal(0, amount, images.shape), 0, 255).astype(np.uint8)


def test_group_diversity_is_zero_for_copies_and_grows_with_differences(scenes):
    copies = np.repeat(scenes[:4], 4, axis=0)  # groups of 4 identical images
    assert group_diversity(copies, 4) == 0.0
    assert group_diversity(scenes, 4) > 0.05
    assert group_diversity(scenes, 1) == 0.0  # no pairs


def test_quality_proxies_see_speckle_and_foreground(scenes):
    clean, noisy = quality_proxies(scenes), quality_proxies(speckle(scenes))
    assert noisy["hf_energy"] > 2 * clean["hf_energy"]
    assert 0.0 < clean["fg_fraction"] < 0.5
    assert quality_proxies(np.zeros_like(scenes)) == {"hf_energy": 0.0, "fg_fraction": 0.0}


def test_quality_drift_flags_only_what_left_its_limits(scenes):
    base = {"diversity": group_diversity(scenes, 4), **quality_proxies(scenes)}
    assert quality_drift(base, dict(base)) == []
    noisy = speckle(scenes)
    now = {"diversity": group_diversity(noisy, 4), **quality_proxies(noisy)}
    drift = quality_drift(base, now)
    assert any(d.startswith("hf_energy") for d in drift)
    collapsed = dict(base, diversity=0.5 * base["diversity"])
    (only,) = quality_drift(base, collapsed)
    assert only.startswith("diversity") and "0.50x" in only
    # strict accuracy up, exact accuracy down: the shapes came with extras (measured: 0.220 -> 0.142)
    (only,) = quality_drift(dict(base, strict_accuracy=0.253, exact_accuracy=0.220),
                            dict(base, strict_accuracy=0.371, exact_accuracy=0.142))
    assert only.startswith("exact_accuracy") and "0.65x" in only
    # a missing or zero baseline is skipped rather than divided by
    assert quality_drift({"hf_energy": 0.0}, {"hf_energy": 1.0}) == []


def test_unknown_reward_names_the_known_ones():
    with pytest.raises(KeyError, match="shapes, shapes_strict, shapes_exact, shapes_soft, brightness"):
        get_reward("clip")


def test_exact_reward_charges_for_objects_the_prompt_did_not_ask_for():
    from fgrpo.tasks.shapes import ObjectSpec, PromptSpec

    rng = np.random.default_rng(0)
    one = S.render("a triangle", rng)
    three = S.render(PromptSpec("counting", (ObjectSpec("triangle", count=3),)), rng)
    prompts, images = ["a triangle", "a triangle"], np.stack([one, three])
    assert [len(S.detect(x)) for x in images] == [1, 3]
    plain, exact = get_reward("shapes")(prompts, images), get_reward("shapes_exact")(prompts, images)
    # GenEval's rules pass both images; the exact reward keeps the first and scales the second by (1/3)^2
    assert plain["strict"].tolist() == [True, True] and plain["reward"].tolist() == [1.0, 1.0]
    assert exact["strict"].tolist() == [True, True]
    assert exact["reward"] == pytest.approx([1.0, 1 / 9])
    # on a counting prompt the expected number is the count: three triangles are not extra
    counted = get_reward("shapes_exact")(["three triangles"], three[None])
    assert counted["reward"].tolist() == [1.0]


def test_extra_objects_never_pay_under_the_exact_reward():
    from fgrpo.tasks.shapes import ObjectSpec, PromptSpec

    rng = np.random.default_rng(1)
    prompt = "a circle and a square"
    one = S.render("a circle", rng)  # half the prompt, nothing extra: partial credit 0.5
    both_plus = S.render(PromptSpec("counting", (ObjectSpec("circle", count=2),)), rng)
    both_plus = np.maximum(both_plus, S.render("a square", rng))
    found = S.detect(both_plus)
    assert sorted(d.shape for d in found) == ["circle", "circle", "square"]  # the fixed seed keeps them apart
    plain = get_reward("shapes")([prompt] * 2, np.stack([one, both_plus]))["reward"]
    exact = get_reward("shapes_exact")([prompt] * 2, np.stack([one, both_plus]))["reward"]
    assert plain[1] > plain[0]  # GenEval's rules: the extra circle helps
    assert exact[1] < exact[0]  # here it does not


def test_exact_accuracy_counts_only_images_without_extra_shapes():
    from fgrpo.evaluate import accuracy_table, format_table

    rng = np.random.default_rng(0)
    one, three = S.render("a triangle", rng), S.render("three triangles", rng)
    prompts = ["a triangle", "a triangle", "three triangles", "a triangle"]
    images = np.stack([one, three, three, np.zeros_like(one)])
    scores = S.score_images(prompts, images)
    assert scores["strict"].tolist() == [True, True, True, False]  # GenEval's rules pass the spare triangles
    assert scores["extra"].tolist() == [0, 2, 0, 0]
    t = accuracy_table(scores["task"], scores["strict"], scores["reward"], scores["extra"])
    assert t["per_task"]["single_object"]["strict_accuracy"] == pytest.approx(2 / 3)
    assert t["per_task"]["single_object"]["exact_accuracy"] == pytest.approx(1 / 3)
    assert t["per_task"]["counting"]["exact_accuracy"] == 1.0  # three asked for, three drawn: nothing extra
    assert t["exact_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert "exact" in format_table(t) and "exact" not in format_table(accuracy_table(scores["task"], scores["strict"], scores["reward"]))


def test_overall_standard_error_follows_the_binomial_and_shrinks_with_images():
    from fgrpo.evaluate import accuracy_table

    def table(n: int, k: int) -> dict:  # two tasks, k of n images right in each
        tasks = ["counting"] * n + ["position"] * n
        strict = np.array(([True] * k + [False] * (n - k)) * 2)
        return accuracy_table(tasks, strict, strict.astype(np.float32))

    t = table(400, 200)
    p = 202 / 404  # Agresti-Coull
    assert t["strict_accuracy"] == 0.5
    assert t["strict_se"] == pytest.approx(np.sqrt(2 * p * (1 - p) / 400) / 2)
    assert table(16, 8)["strict_se"] > table(64, 32)["strict_se"] > t["strict_se"]
    # 4 of 4 right is not certainty
    assert table(4, 4)["strict_se"] > 0.1


def test_soft_reward_pays_for_distinct_named_shapes():
    rng = np.random.default_rng(2)
    prompts = S.load_prompts("train")
    sel = [prompts[i] for i in rng.choice(len(prompts), 48, replace=False)]
    scored = S.score_images(sel, S.render_batch(sel, seed=4))
    assert scored["strict"].all()
    assert scored["soft"].min() > 0.75 and scored["soft"].mean() > 0.9  # correct renderings earn nearly full credit
    soft = get_reward("shapes_soft")
    big = S._draw_scene([("cross", S.COLORS["red"])], np.array([[16.0, 16.0]]), np.array([14.0]), 32)
    # The same cross drawn small: its template correlations come close together, so "cross" is less certain.
    small = S._draw_scene([("cross", S.COLORS["red"])], np.array([[16.0, 16.0]]), np.array([5.0]), 32)
    r = soft(["a red cross"] * 2, np.stack([big, small]))
    assert r["strict"].tolist() == [True, True]
    assert r["reward"][0] > 0.9 and r["reward"][1] < r["reward"][0]
    circle = S._draw_scene([("circle", S.COLORS["red"])], np.array([[16.0, 16.0]]), np.array([14.0]), 32)
    assert soft(["a red cross"], circle[None])["reward"][0] < 0.1  # the wrong shape earns next to nothing
    blue = S._draw_scene([("cross", S.COLORS["blue"])], np.array([[16.0, 16.0]]), np.array([14.0]), 32)
    assert soft(["a red cross"], blue[None])["reward"][0] == pytest.approx(0.5 * r["reward"][0], rel=0.05)


def test_soft_position_and_assignment_follow_the_hard_rules():
    soft = get_reward("shapes_soft")
    left = S._draw_scene([("circle", S.COLORS["white"]), ("square", S.COLORS["white"])],
                         np.array([[8.0, 16.0], [24.0, 16.0]]), np.array([10.0, 10.0]), 32)
    circle = S._draw_scene([("circle", S.COLORS["white"])], np.array([[16.0, 16.0]]), np.array([10.0]), 32)
    r = soft(["a circle left of a square", "a circle right of a square", "a circle and a square",
              "a circle and a square"], np.stack([left, left, left, circle]))
    assert r["strict"].tolist() == [True, False, True, False]
    assert r["reward"][0] > 0.9 and r["reward"][1] == pytest.approx(2 / 3 * r["reward"][0], rel=0.05)
    assert r["reward"][2] > 0.9
    assert 0.4 < r["reward"][3] < 0.55  # one component cannot stand for both objects
    empty = np.zeros((32, 32, 3), np.uint8)
    assert soft(["a circle"], empty[None])["reward"].tolist() == [0.0]


def test_scoring_in_worker_processes_gives_each_image_the_same_scores():
    prompts = S.load_prompts("train")[:24]
    images = S.render_batch(prompts, seed=3)
    images[::3] = images[::3][:, ::-1]  # mirrored scenes: some relations fail, so strict is not all true
    serial = S.score_images(prompts, images)
    pooled = S.score_images(prompts, images, workers=2)
    assert pooled["task"] == serial["task"] and 0 < serial["strict"].sum() < len(prompts)
    for key in ("strict", "reward", "soft", "extra"):
        np.testing.assert_array_equal(pooled[key], serial[key])
    fn = get_reward("shapes_exact", workers=2)
    np.testing.assert_array_equal(fn(prompts, images)["reward"], get_reward("shapes_exact")(prompts, images)["reward"])
