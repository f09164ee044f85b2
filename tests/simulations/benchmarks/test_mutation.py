"""The mutation-testing runner's own logic: mutmut names and diffs read back, its configuration,
and a survivor's disposition in the report (no mutmut run here: that is the benchmark itself)."""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.mutation import (
    Mutant,
    counts,
    diff_lines,
    function_of,
    justification,
    mutmut_config,
    render_markdown,
)
from simulations.benchmarks.mutation_survivors import JUSTIFIED

SHOW = """# server.checkpoints.xǁRunStoreǁarchive_previous__mutmut_2: survived
--- server/checkpoints.py
+++ server/checkpoints.py
@@ -1,6 +1,6 @@
 def archive_previous(self) -> Path | None:
-    if not (self.history.exists() or self.checkpoints.exists()):
+    if not (self.history.exists() and self.checkpoints.exists()):
         return None
"""


def test_mutmut_names_map_to_the_function_they_mutate() -> None:
    module = "server/checkpoints.py"
    assert (
        function_of("server.checkpoints.xǁRunStoreǁarchive_previous__mutmut_2", module)
        == "RunStore.archive_previous"
    )
    assert function_of("server.checkpoints.x_arrays_digest__mutmut_10", module) == "arrays_digest"
    assert (
        function_of(
            "server.strategy.contract.x_short_reason__mutmut_11", "server/strategy/contract.py"
        )
        == "short_reason"
    )


def test_a_diff_is_read_as_its_removed_and_added_lines() -> None:
    assert diff_lines(SHOW) == (
        "if not (self.history.exists() or self.checkpoints.exists()):",
        "if not (self.history.exists() and self.checkpoints.exists()):",
    )


def test_the_config_mutates_one_module_and_runs_only_its_tests() -> None:
    config = mutmut_config("server/checkpoints.py", ["tests/server/test_checkpoints.py"])
    assert "source_paths=server/\n" in config and "only_mutate=server/checkpoints.py\n" in config
    assert "\n    tests/server/test_checkpoints.py\n" in config
    assert "\n    not slow\n" in config and "\n    not resum\n" in config
    assert "\n    server/\n" not in config.split("also_copy=")[1].split("pytest")[0]


def test_a_recorded_reason_matches_only_its_exact_mutant() -> None:
    entry = JUSTIFIED[0]
    mutant = Mutant("x", entry.function, entry.removed, entry.added, "survived")
    assert justification(entry.module, mutant) == entry
    other = Mutant("x", entry.function, entry.removed, entry.added + " ", "survived")
    assert justification(entry.module, other) is None
    assert justification("client/audit.py", mutant) is None


def test_the_report_lists_each_survivor_with_its_disposition() -> None:
    alive = Mutant("m.x_f__mutmut_3", "f", "a > b", "a >= b", "survived")
    entry: dict[str, Any] = {
        "tests": ["tests/t.py"],
        "missing_tests": [],
        "baseline": counts([alive]),
        "final": counts([alive]),
        "survivors": [
            {
                **alive.to_dict(),
                "final_status": "survived",
                "disposition": "equivalent",
                "reason": "a | b",
            }
        ],
        "seconds": 1.0,
    }
    text = render_markdown({"mutmut": "3.8.1", "modules": {"m.py": entry}})
    assert "| `m.py` | 1 | 0 | 1 | 0 | 1 | 0 |" in text
    assert (
        "| 3 | `f` | − `a > b`<br>+ `a >= b` | survived → survived | equivalent: a \\| b |" in text
    )
