"""The one results writer: JSON + markdown side by side, in the committed files' exact format."""

from __future__ import annotations

from pathlib import Path

from simulations.benchmarks.results import RESULTS_DIR, write_results

REPO = Path(__file__).resolve().parents[3]


def test_results_dir_is_the_repos_docs_results() -> None:
    assert RESULTS_DIR == REPO / "docs" / "results"
    assert (RESULTS_DIR / "bench_comm.json").is_file()


def test_writes_json_byte_identical_to_a_committed_result_and_its_markdown(
    tmp_path: Path,
) -> None:
    import json

    committed = RESULTS_DIR / "bench_comm.json"
    document = json.loads(committed.read_text(encoding="utf-8"))
    json_path, md_path = write_results(tmp_path / "new", "bench_comm", document, "# table\n")
    assert (json_path, md_path) == (
        tmp_path / "new" / "bench_comm.json",
        tmp_path / "new" / "bench_comm.md",
    )
    assert json_path.read_bytes() == committed.read_bytes()
    assert md_path.read_text(encoding="utf-8") == "# table\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "bench_comm.json",
        "bench_comm.md",
    ]
