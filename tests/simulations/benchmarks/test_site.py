"""The site-compute benchmark on tiny encoders and the small head preset (one repeat)."""

from __future__ import annotations

from pathlib import Path

from simulations.benchmarks.site import render_markdown, run


def test_bench_site_rows_per_encoder_and_head(tiny_model_dirs: dict[str, Path]) -> None:
    result = run(
        encoders=[
            (str(tiny_model_dirs["text"]), "text", None),
            (str(tiny_model_dirs["image"]), "image", None),
        ],
        presets=["small"],
        repeats=1,
        n_texts=8,
        n_images=4,
    )
    text, image = result["encoders"]
    assert (text["dim"], image["dim"]) == (32, 24)
    assert text["items"] == 8 and image["items"] == 4
    assert all(r["items_per_s"] > 0 and len(r["seconds"]) == 1 for r in (text, image))
    (head,) = result["heads"]
    assert head["head"] == "small" and head["parameters"] > 0
    assert head["infonce_samples_per_s"] > 0 and head["proxy_samples_per_s"] > 0
    # a timing ratio is a benchmark result, not a test verdict: only its presence and sign are checked
    assert head["proxy_dp_samples_per_s"] > 0 and head["dp_overhead"] > 0
    assert {"cpus", "load_average_1_5_15_min", "python", "load_average_after"} <= set(
        result["machine"]
    )
    markdown = render_markdown(result)
    assert "| small |" in markdown and "items/s" in markdown
