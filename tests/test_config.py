"""Config loading: one test per kind of bad input, overrides, and the shipped files."""

import tomllib
from pathlib import Path

import pytest

from fgrpo import config as C

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["geneval.toml", "pretrain.toml", "pretrain_latent.toml", "pretrain_miscaptioned.toml",
                                  "pretrain_weak_prompt.toml"])
def test_shipped_configs_load_and_comment_every_knob(name):
    path = ROOT / "configs" / name
    cfg = C.load(path)
    assert isinstance(cfg, C.Config)
    data = tomllib.loads(path.read_text())
    lines = path.read_text().splitlines()
    for section, values in data.items():
        for key in values:
            line = next(l for l in lines if l.split("=")[0].strip() == key)
            assert "#" in line, f"{name}: {section}.{key} has no comment"


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    p = write(tmp_path, "[train]\nlearning_rate = 1e-4\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(p)
    msg = str(e.value)
    assert str(p) in msg and "train.learning_rate" in msg and "lr" in msg and "\n" not in msg


def test_unknown_section(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown section \[trainer\]"):
        C.load(write(tmp_path, "[trainer]\nlr = 1\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(C.ConfigError, match=r"sample.group_size: expected an integer, got 'eight'"):
        C.load(write(tmp_path, '[sample]\ngroup_size = "eight"\n'))
    with pytest.raises(C.ConfigError, match="expected true or false"):
        C.load(write(tmp_path, "[train]\nglobal_std = 1\n"))


def test_out_of_range(tmp_path):
    with pytest.raises(C.ConfigError, match=r"train.beta: -0.1 is out of range; must be >= 0.0"):
        C.load(write(tmp_path, "[train]\nbeta = -0.1\n"))
    with pytest.raises(C.ConfigError, match=r"sample.noise_level: 1.5 is out of range; must be <= 1.0"):
        C.load(write(tmp_path, "[sample]\nnoise_level = 1.5\n"))


def test_not_a_choice(tmp_path):
    with pytest.raises(C.ConfigError, match=r"sample.kind: 'ddim' is not allowed; choose one of 'sde', 'cps'"):
        C.load(write(tmp_path, '[sample]\nkind = "ddim"\n'))


def test_inconsistent_batch(tmp_path):
    with pytest.raises(C.ConfigError, match="multiple of sample.batch_size"):
        C.load(write(tmp_path, "[sample]\ngroup_size = 3\ngroups_per_epoch = 3\nbatch_size = 4\n"))


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load(tmp_path / "nope.toml")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(write(tmp_path, "[train\nlr = 1\n"))


def test_overrides_apply_and_validate():
    cfg = C.load(ROOT / "configs" / "geneval.toml", ["train.lr=1e-5", "sample.kind=cps", "eval.every=0"])
    assert cfg.train.lr == 1e-5 and cfg.sample.kind == "cps" and cfg.eval.every == 0
    with pytest.raises(C.ConfigError, match="expected section.key=value"):
        C.load(None, ["lr=1"])
    with pytest.raises(C.ConfigError, match="unknown key 'train.nope'"):
        C.load(None, ["train.nope=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load(ROOT / "configs" / "geneval.toml", ["train.lr=2e-4"])
    path = C.save(cfg, tmp_path)
    again = C.load(path)
    assert C.to_dict(again) == C.to_dict(cfg)


@pytest.mark.parametrize("bad", ["[0.0, 1.0]", "[0.8, 0.6]", "[0.5, 1.2]", "[0.5]"])
def test_awm_sigma_range_is_checked(bad):
    with pytest.raises(C.ConfigError, match="train.awm_sigma must be two numbers"):
        C.load(None, [f"train.awm_sigma={bad}"])


def test_ref_guidance_without_a_kl_it_could_change_is_refused():
    assert C.load(None, ["train.beta=1.0", "train.ref_guidance=4.5"]).train.ref_guidance == 4.5
    with pytest.raises(C.ConfigError, match="train.ref_guidance=4.5 has no effect with train.beta=0"):
        C.load(None, ["train.beta=0.0", "train.ref_guidance=4.5"])
    awm = C.load(None, ["train.beta=1.0", "train.ref_guidance=4.5", 'train.objective="awm"'])
    assert awm.train.ref_guidance == 4.5 and awm.train.objective == "awm"
