"""The encoder-precision experiment: its report's structure and the paired fp32/bf16 arithmetic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from simulations.experiments.encoder_precision import (
    FROZEN_PROBE,
    METRICS,
    RESULT_NAME,
    RULE,
    DatasetConfig,
    available_precisions,
    paired_comparison,
    rebuild,
    run_all,
    summarize,
)


def test_paired_comparison_arithmetic_and_rule() -> None:
    fp32 = [0.70, 0.74, 0.72]
    bf16 = [0.71, 0.73, 0.725]
    out = paired_comparison(fp32, bf16)
    diffs = np.asarray(bf16) - np.asarray(fp32)
    assert out["difference"]["values"] == pytest.approx(diffs.tolist())
    assert out["difference"]["mean"] == pytest.approx(diffs.mean())
    assert out["difference"]["sd"] == pytest.approx(diffs.std(ddof=1))
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert out["difference"]["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    assert out["seed_sd_fp32"] == pytest.approx(np.std(fp32, ddof=1))
    assert out["fp32"]["mean"] == pytest.approx(np.mean(fp32))
    assert out["bf16"]["sd"] == pytest.approx(np.std(bf16, ddof=1))
    # |+0.0017| <= fp32 sd 0.02 and the interval covers 0
    assert out["within_seed_noise"] is True and out["verdict"] == "within seed noise"

    shifted = paired_comparison(fp32, [v + 0.05 for v in fp32[:2]] + [fp32[2] + 0.051])
    assert shifted["within_seed_noise"] is False  # a consistent +0.05 shift > sd 0.02
    assert shifted["verdict"] == "NOT within seed noise"

    one = paired_comparison([0.5], [0.6])
    assert one["difference"]["mean"] == pytest.approx(0.1)
    assert one["difference"]["ci95"] is None and one["within_seed_noise"] is None
    assert one["verdict"].startswith("undetermined")


def test_summarize_pairs_by_seed_not_by_order() -> None:
    entries = [
        {"seed": 1, "precision": "bf16", "metrics": {"zs_auroc": 0.80}},
        {"seed": 0, "precision": "fp32", "metrics": {"zs_auroc": 0.60, "probe_f1_macro": 0.5}},
        {
            "seed": 0,
            "precision": "bf16",
            "metrics": {"zs_auroc": 0.62, "probe_f1_macro": 0.4},
            FROZEN_PROBE: 0.3,
        },
        {"seed": 1, "precision": "fp32", "metrics": {"zs_auroc": 0.70}},
    ]
    summary = summarize(entries, ["fp32", "bf16"])
    paired = summary["zs_auroc"]["paired"]
    assert paired["seeds"] == [0, 1]
    assert paired["difference"]["values"] == pytest.approx([0.02, 0.10])
    assert summary["probe_f1_macro"]["paired"]["seeds"] == [0]
    assert summary["probe_f1_macro"]["paired"]["difference"]["mean"] == pytest.approx(-0.1)
    assert "mean_R@5" not in summary
    assert summary[FROZEN_PROBE]["by_precision"]["bf16"]["mean"] == pytest.approx(0.3)
    assert "paired" not in summary[FROZEN_PROBE]  # fp32 has no frozen probe value to pair
    only_fp32 = summarize([e for e in entries if e["precision"] == "fp32"], ["fp32"])
    assert "paired" not in only_fp32["zs_auroc"]
    assert only_fp32["zs_auroc"]["by_precision"]["fp32"]["mean"] == pytest.approx(0.65)


def test_run_all_writes_a_paired_report(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = DatasetConfig(
        "tiny-radiology",
        "synthetic-radiology",
        n=120,
        image_encoder=str(tiny_model_dirs["image"]),
        text_encoder=str(tiny_model_dirs["text"]),
        encoder_image_size=32,
        note="tiny random encoders",
    )
    precisions, note = available_precisions()
    document = run_all(
        configs={config.name: config},
        seeds=[0],
        epochs=1,
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        echo=False,
    )
    written = json.loads((tmp_path / "out" / f"{RESULT_NAME}.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "out" / f"{RESULT_NAME}.md").read_text(encoding="utf-8")
    assert written["precisions"] == precisions == document["precisions"]
    assert RULE in markdown
    result = written["datasets"]["tiny-radiology"]
    assert set(result["auto"]) == {"image", "text"}
    for resolved in result["auto"].values():
        assert resolved["precision"] in ("fp32", "bf16") and resolved["device"] == "cpu"
    assert set(result["embedding"]) == set(precisions)
    entries = result["seeds"]
    assert sorted(e["precision"] for e in entries) == sorted(precisions)
    for e in entries:
        assert set(e["metrics"]) == set(METRICS)  # paired + labelled + prompts: all three
        assert all(0.0 <= v <= 1.0 for v in e["metrics"].values())
        assert e["train_rows"] + e["test_rows"] == 120
        assert (
            result["embedding"][e["precision"]]["runtimes"]["image"]["precision"]
            == (e["precision"])
        )
    if "bf16" not in precisions:  # no native bfloat16 here: said so, nothing paired
        assert note and note in markdown
        assert all("paired" not in s for s in result["summary"].values())
        return
    assert not note
    assert len({e["test_ids_sha256"] for e in entries}) == 1  # same held-out rows
    by = {e["precision"]: e["metrics"] for e in entries}
    by_frozen = {e["precision"]: e[FROZEN_PROBE] for e in entries}
    for metric in METRICS:
        paired = result["summary"][metric]["paired"]
        assert paired["seeds"] == [0]
        assert paired["difference"]["mean"] == pytest.approx(
            by["bf16"][metric] - by["fp32"][metric]
        )
        assert paired["verdict"].startswith("undetermined")  # one seed: no sd, no interval
    frozen = result["summary"][FROZEN_PROBE]["paired"]["difference"]["mean"]
    assert frozen == pytest.approx(by_frozen["bf16"] - by_frozen["fp32"])
    rebuilt = rebuild(tmp_path / "out")  # recomputed from the stored rows: the same summary
    assert json.dumps(rebuilt["datasets"]["tiny-radiology"]["summary"], sort_keys=True) == (
        json.dumps(result["summary"], sort_keys=True)  # NaN sds (one seed) compare as text
    )
    cosine = result["cosine"]
    assert set(cosine) == {"image", "text", "prompts"}
    for c in cosine.values():
        assert -1.0 <= c["min"] <= c["p01"] <= c["median"] <= 1.0 + 1e-9
    assert cosine["image"]["items"] == cosine["text"]["items"] == 120
    assert "bf16 - fp32 (mean)" in markdown and "Per-item cosine" in markdown
