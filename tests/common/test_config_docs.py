"""docs/configuration.md documents every settings key and is current."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from common import config_docs
from common.config import RunSettings, SiteSettings
from common.privacy import PrivacySettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

CLASSES = [
    (RunSettings, config_docs.RUN_MEANINGS),
    (SiteSettings, config_docs.SITE_MEANINGS),
    (PrivacySettings, config_docs.PRIVACY_MEANINGS),
]


@pytest.mark.parametrize(("cls", "meanings"), CLASSES, ids=lambda c: getattr(c, "__name__", ""))
def test_every_field_has_a_meaning_and_no_meaning_is_stale(cls: type, meanings: dict[str, str]):
    names = {f.name for f in fields(cls)}
    assert sorted(names - set(meanings)) == [], f"{cls.__name__} fields without a meaning"
    assert sorted(set(meanings) - names) == [], f"meanings naming no {cls.__name__} field"
    assert all(text.strip() for text in meanings.values())


def test_render_lists_every_key_with_its_default():
    text = config_docs.render()
    assert "| `num-server-rounds` | `3` |" in text
    assert '| `on-bad-row` | `"raise"` |' in text
    assert "| `dp-noise-multiplier` | `unset` |" in text
    assert "| `report-eval` | `true` |" in text


def test_docs_configuration_is_current():
    assert DOC.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/configuration.md is stale: python -m common.config_docs > docs/configuration.md"
    )
