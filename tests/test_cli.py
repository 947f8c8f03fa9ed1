"""The command line as a user meets it: eval writes its table and files, sample writes PNGs,
bad input exits with one clear line."""

import json
from pathlib import Path

import pytest

from fgrpo import config as C
from fgrpo.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_eval_writes_metrics_and_grid(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\nthree squares\na red cross\na circle above a square\n")
    out = tmp_path / "eval"
    rc = main(["eval", str(ROOT / "configs" / "geneval.toml"), "--out", str(out),
               "--set", f'model.path="{tiny_model_dir}"', "--set", "eval.num_steps=3",
               "--set", "eval.images_per_prompt=2", "--set", "eval.min_images_per_task=0",
               "--set", f'eval.prompts="{prompts}"', "--set", "run.progress=false"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_task"]) == {"single_object", "counting", "colors", "position"}
    assert 0.0 <= metrics["strict_accuracy"] <= 1.0
    assert metrics["num_images"] == 8
    assert (out / "eval_grid.png").stat().st_size > 0 and (out / "config.toml").is_file()
    printed = capsys.readouterr().out
    assert "overall" in printed and "counting" in printed
    assert 0.0 < metrics["strict_se"] < 0.5 and f"(standard error {metrics['strict_se']:.3f})" in printed
    # A prompt file is not the held-out set, and the table must not call it that.
    assert metrics["prompts"] == str(prompts)
    assert "p.txt prompt strict accuracy" in printed and "held-out" not in printed


def test_task_types_with_few_prompts_get_more_images(tmp_path, tiny_model_dir):
    from fgrpo.evaluate import images_per_prompt, resolve_prompts
    from fgrpo.tasks import shapes

    held_out = resolve_prompts("test")
    counts = images_per_prompt(held_out, 4, 32)
    per_task = {}
    for p, k in zip(held_out, counts):
        per_task.setdefault(shapes.parse_prompt(p).task, []).append(k)
    # single_object is one held-out prompt: 32 images instead of 4; tasks with many prompts keep 4
    assert per_task["single_object"] == [32] and set(per_task["two_object"]) == {8} and sum(per_task["colors"]) == 36
    assert set(per_task["color_attr"]) == {4} and set(per_task["position"]) == {4}
    assert images_per_prompt(held_out, 4, 0) == [4] * len(held_out)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\nthree squares\ntwo circles\na red cross\n")
    out = tmp_path / "eval"
    rc = main(["eval", str(ROOT / "configs" / "geneval.toml"), "--out", str(out),
               "--set", f'model.path="{tiny_model_dir}"', "--set", "eval.num_steps=2", "--set", "eval.images_per_prompt=1",
               "--set", "eval.min_images_per_task=4", "--set", f'eval.prompts="{prompts}"', "--set", "run.progress=false"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {t: v["n"] for t, v in metrics["per_task"].items()} == {"single_object": 4, "counting": 4, "colors": 4}
    assert metrics["num_images"] == 12 and metrics["diversity"] > 0


def test_prompt_set_names():
    from fgrpo.evaluate import prompt_set_name
    assert prompt_set_name("test") == "held-out"
    assert prompt_set_name("train") == "train-prompt"
    assert prompt_set_name("/tmp/x/position.txt") == "position.txt prompt"
    assert prompt_set_name("test:position") == "held-out position"
    assert prompt_set_name("train:colors,counting") == "train-prompt colors+counting"


def test_prompt_sets_limited_to_task_types():
    from fgrpo.evaluate import resolve_prompts
    from fgrpo.tasks import shapes
    for split in ("train", "test"):
        everything = resolve_prompts(split)
        position = resolve_prompts(f"{split}:position")
        two = resolve_prompts(f"{split}: colors , counting")
        assert position and all(shapes.parse_prompt(p).task == "position" for p in position)
        assert position == [p for p in everything if shapes.parse_prompt(p).task == "position"]
        assert {shapes.parse_prompt(p).task for p in two} == {"colors", "counting"}
        assert len(two) == sum(shapes.parse_prompt(p).task in ("colors", "counting") for p in everything)
    # the held-out prompts stay held out when limited
    assert not set(resolve_prompts("test:position")) & set(resolve_prompts("train:position"))


def test_sample_writes_images(tmp_path, tiny_model_dir):
    rc = main(["sample", "--prompt", "a blue square", "--num", "3", "--steps", "2", "--out", str(tmp_path),
               "--set", f'model.path="{tiny_model_dir}"'])
    assert rc == 0
    assert len(list(tmp_path.glob("a_blue_square_*.png"))) == 3


@pytest.mark.parametrize("argv, needle", [
    (["eval", "nope.toml"], "config file not found"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", "train.lr=-1"], "train.lr"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", 'model.path="/no/such/dir"'], "/no/such/dir"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", 'eval.prompts="/no/prompts.txt"'], "/no/prompts.txt"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", 'eval.prompts="test:positions"'], "unknown task type positions"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", 'eval.prompts="test:"'], "names no task type"),
    (["eval", str(ROOT / "configs" / "geneval.toml"), "--set", 'eval.prompts="test:colour"'], "choose from single_object"),
])
def test_user_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgrpo: error:") and needle in err and "\n" not in err


@pytest.mark.parametrize("command", ["eval", "train"])
@pytest.mark.parametrize("lines, needle", [
    ("a circle\na red circle left of a blue square\n", "prompts.txt:2: shapes prompt 'a red circle left of"),
    ("\n\n", "holds no prompts"),
])
def test_bad_prompt_files_name_the_line_to_fix(tmp_path, capsys, command, lines, needle):
    bad = tmp_path / "prompts.txt"
    bad.write_text(lines)
    key = "eval.prompts" if command == "eval" else "reward.prompts"
    argv = [command, str(ROOT / "configs" / "geneval.toml"), "--set", f'{key}="{bad}"',
            "--set", f'run.output_dir="{tmp_path / "run"}"']
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgrpo: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_train_refuses_to_replace_a_run_and_says_how_to_go_on(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"an earlier run")
    argv = ["train", str(ROOT / "configs" / "geneval.toml"), "--set", f'run.output_dir="{out}"']
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fgrpo: error:") and f"--resume {out}" in err and "--overwrite" in err and "\n" not in err
    assert (out / "checkpoint.pt").read_bytes() == b"an earlier run"


def test_accuracy_plot_names_the_prompt_set(tmp_path, monkeypatch):
    from fgrpo import plot
    seen = {}
    monkeypatch.setattr(plot, "line_plot", lambda series, path, **kw: seen.update(kw, series=series))
    evals = [{"wall": w, "strict_accuracy": a, "prompts": "train", "per_task": {"counting": {"strict_accuracy": a}}}
             for w, a in ((0.0, 0.25), (10.0, 0.5))]
    plot.accuracy_plot(evals, tmp_path / "a.png")
    assert seen["ylabel"] == "train-prompt strict accuracy"
    assert seen["series"]["overall"] == [(0.0, 0.25), (10.0, 0.5)]
    plot.accuracy_plot([{k: v for k, v in e.items() if k != "prompts"} for e in evals], tmp_path / "b.png")
    assert seen["ylabel"] == "held-out strict accuracy"  # runs from before evaluations recorded their prompts


def test_the_shipped_config_trains_its_shipped_base_end_to_end(tmp_path, capsys):
    """The default path users run, cut to one tiny epoch: the shipped latent base, the guided KL, the CLI."""
    out = tmp_path / "run"
    sets = ["sample.group_size=4", "sample.groups_per_epoch=2", "sample.batch_size=2", "sample.num_steps=4",
            "sample.window_range=[0, 1]", "train.epochs=1", "eval.num_steps=2", "eval.images_per_prompt=1",
            "eval.min_images_per_task=0", 'eval.prompts="test:colors"', f'run.output_dir="{out}"',
            "run.progress=false", "run.time_limit_minutes=0", "reward.workers=1"]
    assert main(["train", str(ROOT / "configs" / "geneval.toml"), *[a for s in sets for a in ("--set", s)]]) == 0
    resolved = C.load(out / "config.toml")
    assert resolved.model.path == "shipped:latent_weak_prompt"
    assert resolved.train.beta > 0 and resolved.train.ref_guidance > 1 and resolved.sample.guidance_scale == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["strict_accuracy"] is not None and metrics["after"]["strict_accuracy"] is not None
    epoch = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # The reference is the base under guidance, the policy samples without: the KL is not zero from the start.
    assert epoch["kl"] > 0 and epoch["opt_steps"] == 1
    assert (out / "model" / "vae").is_dir()
