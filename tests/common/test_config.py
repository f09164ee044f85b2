"""Run-config and node-config parsing: the values reach the data spec, bad values are named."""

from __future__ import annotations

import pytest

from common.config import HEAD_PRESET_NAMES, LOSSES, RunSettings, SiteSettings
from common.errors import ConfigError


def test_a_site_chooses_how_much_it_holds_out() -> None:
    run = RunSettings.from_run_config({})
    assert SiteSettings().data_spec(run).test_fraction == 0.2
    site = SiteSettings.from_node_config({"test-fraction": "0.1", "data": "site.csv"})
    assert site.data_spec(run).test_fraction == pytest.approx(0.1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match=r"node-config: test-fraction must be in \(0, 1\)"):
            SiteSettings.from_node_config({"test-fraction": bad})


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
