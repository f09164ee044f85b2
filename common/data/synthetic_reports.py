"""Report wording for `synthetic-radiology`: templated sentences filled from a case's attributes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.errors import ConfigError

REPORT_STYLES = ("structured", "narrative", "terse")

_INDICATIONS = (
    "Cough.",
    "Shortness of breath.",
    "Fever.",
    "Chest pain.",
    "Preoperative evaluation.",
    "Follow-up.",
    "Hypoxia.",
    "Evaluate for pneumonia.",
    "Trauma.",
    "Weakness.",
)

_NEGATIONS: dict[str, tuple[str, ...]] = {
    "lungs": (
        "The lungs are clear.",
        "Lungs are clear bilaterally.",
        "No focal airspace disease.",
        "No focal consolidation.",
    ),
    "heart": (
        "Heart size is normal.",
        "The cardiac silhouette is within normal limits.",
        "Normal heart size (cardiothoracic ratio {ctr:.2f}).",
        "The cardiomediastinal silhouette is normal.",
    ),
    "effusion": (
        "No pleural effusion.",
        "No pleural effusions.",
        "The costophrenic angles are sharp.",
        "There is no pleural effusion.",
    ),
    "nodule": ("No suspicious pulmonary nodules.", "No focal nodule or mass."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "bones": (
        "Osseous structures are intact.",
        "No acute osseous abnormality.",
        "Visualized bones are unremarkable.",
    ),
}

_NEGATION_EXCLUDES = {
    "normal": set(),
    "nodule": {"lungs", "nodule"},
    "opacity": {"lungs"},
    "cardiomegaly": {"heart"},
    "effusion": {"effusion", "lungs"},
}

_POSITIVE: dict[str, tuple[str, ...]] = {
    "nodule": (
        "There is a {size_mm} mm nodule in the {side} {zone} lobe.",
        "{A_an} {size_mm}-mm {adjective}pulmonary nodule projects over the {side} {zone} lung zone.",
        "{Side} {zone} lobe nodule measuring {size_cm:.1f} cm.",
        "Solitary {size_mm} mm nodule in the {side} {zone} lobe.",
    ),
    "opacity": (
        "{Density} airspace opacity in the {side} {lobe} lobe.",
        "There is {density} opacity in the {side} {lobe} lobe, which may represent pneumonia.",
        "{Side} {lobe} lobe {density} airspace disease.",
    ),
    "cardiomegaly": (
        "The heart is {severity_adverb} enlarged (cardiothoracic ratio {ctr:.2f}).",
        "{Severity} cardiomegaly.",
        "{Severity} enlargement of the cardiac silhouette, cardiothoracic ratio {ctr:.2f}.",
    ),
    "effusion": (
        "{Size} {side} pleural {effusions} with blunting of the {angles}.",
        "Blunting of the {angles}, consistent with {article}{size} {side} pleural {effusions}.",
        "There {is_are} {article}{size} {side} pleural {effusions}.",
    ),
}

_IMPRESSIONS: dict[str, tuple[str, ...]] = {
    "normal": (
        "No acute cardiopulmonary abnormality.",
        "Normal chest radiograph.",
        "No acute cardiopulmonary process.",
        "No active disease.",
    ),
    "nodule": (
        "{Side} {zone} lobe pulmonary nodule; CT recommended for further evaluation.",
        "{size_mm} mm {side} {zone} lobe nodule.",
        "Pulmonary nodule, follow-up CT advised.",
    ),
    "opacity": (
        "{Side} {lobe} lobe opacity, likely pneumonia in the appropriate clinical setting.",
        "Findings concerning for {side} {lobe} lobe pneumonia.",
        "Airspace disease as above.",
    ),
    "cardiomegaly": (
        "{Severity} cardiomegaly without pulmonary edema.",
        "Cardiomegaly.",
        "Enlarged heart, no acute process.",
    ),
    "effusion": ("{Size} {side} pleural {effusions}.", "Pleural {effusions} as described."),
}

_DEVICE_SENTENCES = {
    "endotracheal tube": (
        "Endotracheal tube tip is {cm:.1f} cm above the carina.",
        "ETT in place, terminating {cm:.1f} cm above the carina.",
    ),
    "right internal jugular catheter": (
        "Right internal jugular central venous catheter with tip in the superior vena cava.",
        "Right IJ central line terminates in the SVC.",
    ),
    "left subclavian catheter": (
        "Left subclavian central venous catheter with tip in the superior vena cava.",
        "Left subclavian line tip projects over the SVC.",
    ),
    "nasogastric tube": (
        "Nasogastric tube courses below the diaphragm into the stomach.",
        "Enteric tube tip is in the stomach.",
    ),
}

_NO_DEVICE = ("No support devices.", "No lines or tubes.")

_DENSITY_WORDS = {
    "faint": ("faint", "hazy", "subtle"),
    "patchy": ("patchy", "ill-defined", "streaky"),
    "dense": ("dense", "confluent", "consolidative"),
}

_SEVERITY_ADVERBS = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}


def write_report(
    attrs: dict[str, Any], rng: np.random.Generator, *, style: str = "structured"
) -> str:
    """A radiology report for a case's attributes, with randomly chosen wording.

    The positive-finding sentence always carries the attributes (size, side, zone/lobe, density,
    severity or cardiothoracic ratio, effusion size); other findings are negated.
    """
    if style not in REPORT_STYLES:
        raise ConfigError(f"report style must be one of {', '.join(REPORT_STYLES)}, got {style!r}")
    finding = attrs["finding"]
    words = _template_words(attrs, rng)
    positive = [_pick(rng, _POSITIVE[finding]).format(**words)] if finding in _POSITIVE else []
    negations = _negations(
        finding, words, rng, count=1 if style == "terse" else int(rng.integers(2, 5))
    )
    device = _device_sentence(attrs, rng)
    impression = _pick(rng, _IMPRESSIONS[finding]).format(**words)
    if style == "terse":
        return " ".join(
            [*positive, *device, *negations] if positive else [impression, *device, *negations]
        )
    findings = " ".join([*positive, *device, *negations])
    if style == "narrative":
        return f"{findings} {impression}"
    indication = f"INDICATION: {_pick(rng, _INDICATIONS)} " if rng.random() < 0.6 else ""
    return f"{indication}FINDINGS: {findings} IMPRESSION: {impression}"


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _template_words(attrs: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    words: dict[str, Any] = {**attrs}
    if "side" in attrs:
        words["Side"] = str(attrs["side"]).capitalize()
    if "size_mm" in attrs:
        words["size_cm"] = attrs["size_mm"] / 10.0
        words["A_an"] = (
            "An" if str(attrs["size_mm"]).startswith("8") or attrs["size_mm"] in (11, 18) else "A"
        )
        words["adjective"] = _pick(rng, ("", "well-circumscribed ", "rounded ", "noncalcified "))
    if "density" in attrs:
        words["density"] = _pick(rng, _DENSITY_WORDS[attrs["density"]])
        words["Density"] = words["density"].capitalize()
    if "severity" in attrs:
        words["Severity"] = str(attrs["severity"]).capitalize()
        words["severity_adverb"] = _SEVERITY_ADVERBS[attrs["severity"]]
    if attrs["finding"] == "effusion":
        bilateral = attrs["side"] == "bilateral"
        words["Size"] = str(attrs["size"]).capitalize()
        words["effusions"] = "effusions" if bilateral else "effusion"
        words["is_are"] = "are" if bilateral else "is"
        words["article"] = "" if bilateral else "a "
        words["angles"] = (
            "costophrenic angles" if bilateral else f"{attrs['side']} costophrenic angle"
        )
    return words


def _negations(
    finding: str, words: dict[str, Any], rng: np.random.Generator, *, count: int
) -> list[str]:
    groups = [name for name in _NEGATIONS if name not in _NEGATION_EXCLUDES[finding]]
    chosen = rng.permutation(len(groups))[: min(count, len(groups))]
    sentences = [_pick(rng, _NEGATIONS[groups[i]]).format(**words) for i in chosen]
    if finding == "nodule" and rng.random() < 0.5:
        sentences.insert(0, "The lungs are otherwise clear.")
    return sentences


def _device_sentence(attrs: dict[str, Any], rng: np.random.Generator) -> list[str]:
    device = attrs.get("device")
    if device is None:
        return [_pick(rng, _NO_DEVICE)] if rng.random() < 0.3 else []
    cm = attrs.get("device_cm_above_carina", 0.0)
    return [_pick(rng, _DEVICE_SENTENCES[device]).format(cm=cm)]
