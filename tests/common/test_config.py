"""Run-config and node-config parsing: the values reach the data spec, bad values are named."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from common.config import HEAD_PRESET_NAMES, LOSSES, RunSettings, SiteSettings
from common.errors import ConfigError, PrivacyError


def test_a_site_chooses_how_much_it_holds_out() -> None:
    run = RunSettings.from_run_config({})
    assert SiteSettings().data_spec(run).test_fraction == 0.2
    site = SiteSettings.from_node_config({"test-fraction": "0.1", "data": "site.csv"})
    assert site.data_spec(run).test_fraction == pytest.approx(0.1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match=r"node-config: test-fraction must be in \(0, 1\)"):
            SiteSettings.from_node_config({"test-fraction": bad})


def test_dataset_image_size_draws_the_run_dataset_at_that_side_and_nothing_else() -> None:
    from common.data.registry import load_dataset

    run = RunSettings.from_run_config({"dataset-image-size": 24, "dataset-n": 8})
    spec = SiteSettings(partition_id=1, num_partitions=2).data_spec(run)
    assert spec.image_size == 24
    images = load_dataset(spec.dataset, n=spec.n, image_size=spec.image_size).images
    assert images is not None and images[0].load().shape[:2] == (24, 24)
    assert SiteSettings().data_spec(RunSettings()).image_size is None  # 0: the generator's own
    own = SiteSettings.from_node_config({"data": "site.csv"})  # a site's own manifest: untouched
    assert own.data_spec(run).image_size is None
    with pytest.raises(ConfigError, match=r"dataset-image-size .* got 24 for dataset 'iu-xray"):
        RunSettings.from_run_config({"dataset": "iu-xray-reports", "dataset-image-size": 24})
    for bad, smallest in ((-1, 16), (12, 16)):  # the generator draws nothing smaller
        with pytest.raises(ConfigError, match=rf"must be 0 \(the dataset's own\) or >= {smallest}"):
            RunSettings.from_run_config({"dataset-image-size": bad})
    assert RunSettings.from_run_config({"dataset": "digits", "dataset-image-size": 8})
    with pytest.raises(ConfigError, match=r"or >= 8 for digits, got 4"):
        RunSettings.from_run_config({"dataset": "digits", "dataset-image-size": 4})


def test_run_config_names_an_unknown_loss_before_anything_runs() -> None:
    assert RunSettings.from_run_config({"loss": "infonce+supcon+prompts"}).loss in LOSSES
    with pytest.raises(ConfigError, match=r"run-config: loss 'clip' is not one of infonce, "):
        RunSettings.from_run_config({"loss": "clip"})


def test_run_config_names_an_unknown_head_preset_before_any_encoder_loads() -> None:
    from common.heads import HEAD_PRESETS

    assert tuple(HEAD_PRESETS) == HEAD_PRESET_NAMES  # the cheap list names every real preset
    assert RunSettings.from_run_config({"head": "small"}).head == "small"
    with pytest.raises(ConfigError, match=r"run-config: head 'huge' is not one of default, "):
        RunSettings.from_run_config({"head": "huge"})


def test_pyproject_run_config_defaults_are_run_settings_defaults() -> None:
    """[tool.flwr.app.config] lists exactly RunSettings' keys (plus dp-* run keys), same defaults."""
    import tomli

    from common.privacy import PrivacySettings

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    config = tomli.loads(pyproject.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
    dp = {k: v for k, v in config.items() if k.startswith("dp-")}
    run = {k.replace("-", "_"): v for k, v in config.items() if k not in dp}
    defaults = {f.name: f.default for f in fields(RunSettings)}
    assert sorted(run) == sorted(defaults)
    assert {k: v for k, v in run.items() if v != defaults[k]} == {}
    assert all(type(run[k]) is type(defaults[k]) for k in run), "a default's type differs"
    assert PrivacySettings.merge(dp, {}) == PrivacySettings()


def test_loss_names_and_needs_come_from_the_registry() -> None:
    from common import registries
    from common.losses import NEEDS_LABELS, NEEDS_PROMPTS
    from common.privacy import require_sample_level_dp

    assert list(LOSSES) == list(registries.LOSSES)
    assert set(NEEDS_LABELS) == {n for n, i in registries.LOSSES.items() if i.labels}
    assert NEEDS_PROMPTS == (
        "infonce+supcon+prompts",
        "infonce+prompts",
        "prompts",
        "infonce-public",
        "infonce-public+prompts",
    )
    per_example = ("proxy", "prompts", "infonce-public", "infonce-public+prompts")
    assert registries.sample_dp_losses() == per_example
    for name in ("auto", *per_example):  # auto chooses a per-example objective under DP
        require_sample_level_dp(name)
    for name in set(registries.LOSSES) - {"auto", *per_example}:
        with pytest.raises(PrivacyError, match=f"refused for loss '{re.escape(name)}'"):
            require_sample_level_dp(name)
    with pytest.raises(ConfigError, match="unknown loss 'clip'"):
        require_sample_level_dp("clip")
    assert tuple(registries.HEADS) == HEAD_PRESET_NAMES


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"ntd-beta": -1.0}, "ntd-beta"),
        ({"ntd-beta": float("inf")}, "ntd-beta"),
        ({"ntd-tau": 0.0}, "ntd-tau"),
    ],
)
def test_run_config_refuses_a_bad_fedntd_setting(values: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=f"run-config: {key} must be"):
        RunSettings.from_run_config(values)


@pytest.mark.parametrize(
    "values",
    [{"loss": "infonce"}, {"loss": "infonce+supcon"}, {"layout": "concat", "loss": "auto"}],
)
def test_run_config_refuses_fedntd_where_there_are_no_class_prompt_logits(
    values: dict[str, str],
) -> None:
    with pytest.raises(ConfigError, match="ntd-beta > 0 distils class-prompt logits"):
        RunSettings.from_run_config({"ntd-beta": 1.0, **values})
    RunSettings.from_run_config(values)  # fine without it


def test_fedntd_settings_reach_every_rounds_local_training() -> None:
    run = RunSettings.from_run_config({"ntd-beta": 0.5, "ntd-tau": 2.0})
    for first in (True, False):
        config = run.train_config(first_round=first)
        assert (config.ntd_beta, config.ntd_tau) == (0.5, 2.0)
    assert RunSettings().train_config().ntd_beta == 0.0  # off unless named


def test_the_runs_data_spec_reads_a_dataset_whole_with_the_runs_settings() -> None:
    run = RunSettings.from_run_config(
        {
            "dataset": "synthetic-radiology",
            "dataset-n": 300,
            "dataset-image-size": 32,
            "seed": 4,
            "max-length": 48,
            "task": "nodule",
        }
    )
    own = run.data_spec()
    assert own.task == "nodule"
    assert (own.dataset, own.n, own.image_size, own.seed, own.max_length) == (
        "synthetic-radiology",
        300,
        32,
        4,
        48,
    )
    other = run.data_spec("digits", n=0, seed=11)  # another generator: its own size, all rows
    assert (other.n, other.image_size, other.seed) == (None, None, 11)
    manifest = run.data_spec("/data/site.csv", n=50)  # a manifest is read whole, without a task
    assert (manifest.n, manifest.image_size, manifest.task) == (None, None, None)
