"""No GPL distribution among fedembed's installed runtime dependencies.

fedembed is Apache-2.0 and hospitals' legal teams reject GPL runtime dependencies. The walk starts
at pyproject.toml's [project] dependencies (the installed fedembed metadata can predate an edit)
and follows each installed distribution's requirements, with the extras asked for. A licence is
read from the SPDX License-Expression, else a short License field, else the License classifiers;
a distribution none of which names a known licence is listed as unknown.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import tomli
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# SPDX identifiers accepted: permissive ones, and MPL-2.0, whose copyleft covers only the files
# of the MPL'd package itself (certifi's CA bundle, tqdm, pathspec).
ACCEPTED_SPDX = {
    "0BSD", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "BSL-1.0", "CC0-1.0", "CNRI-Python",
    "HPND", "ISC", "MIT", "MIT-0", "MIT-CMU", "MPL-2.0", "PSF-2.0", "Python-2.0", "Unlicense",
    "Zlib",
}  # fmt: skip
ACCEPTED_EXCEPTIONS = {"LLVM-exception"}
# Free-text License fields (not SPDX expressions) met in the torch / ray / flwr tree (lower case).
ACCEPTED_TEXT = {
    "apache 2.0", "apache 2.0 license", "bsd", "3-clause bsd license", "bsd, public domain",
    "isc license", "mit license",
}  # fmt: skip
ACCEPTED_CLASSIFIERS = {
    "Apache Software License", "BSD License", "ISC License (ISCL)", "MIT License",
    "MIT No Attribution License (MIT-0)", "Mozilla Public License 2.0 (MPL 2.0)",
    "Python Software Foundation License", "The Unlicense (Unlicense)", "zlib/libpng License",
}  # fmt: skip
COPYLEFT = re.compile(r"\b(A|L)?GPL|General Public License", re.IGNORECASE)
SHORT_LICENCE_FIELD = 80  # longer: a pasted licence text, left to the classifiers


def _runtime_roots() -> list[Requirement]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        project = tomli.load(handle)["project"]
    return [Requirement(spec) for spec in project["dependencies"]]


def _find(name: str, path: list[str]) -> metadata.Distribution | None:
    wanted = canonicalize_name(name)
    for dist in metadata.distributions(path=path):
        if canonicalize_name(dist.name or "") == wanted:
            return dist
    return None


def _walk(
    roots: Iterable[Requirement], path: list[str]
) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """Installed distributions reachable from ``roots`` and the requirements not installed."""
    found: dict[str, metadata.Distribution] = {}
    asked: set[tuple[str, frozenset[str]]] = set()
    missing: list[str] = []
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in asked:
            continue
        asked.add((name, frozenset(requirement.extras)))
        dist = found.get(name) or _find(name, path)
        if dist is None:
            missing.append(str(requirement))
            continue
        found[name] = dist
        extras = {"", *requirement.extras}
        for spec in dist.requires or []:
            child = Requirement(spec)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in extras):
                todo.append(child)
    return found, missing


def _spdx_accepted(expression: str) -> bool:
    """An SPDX expression (AND / OR / WITH / parentheses) satisfiable with accepted terms; False
    for anything else."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    position = 0

    def term() -> bool:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "(":
            value = either()
            position += 1  # ")"
        else:
            value = token.removesuffix("+") in ACCEPTED_SPDX
        if position < len(tokens) and tokens[position] == "WITH":
            value = value and tokens[position + 1] in ACCEPTED_EXCEPTIONS
            position += 2
        return value

    def both() -> bool:
        nonlocal position
        value = term()
        while position < len(tokens) and tokens[position] == "AND":
            position += 1
            value = term() and value
        return value

    def either() -> bool:
        nonlocal position
        value = both()
        while position < len(tokens) and tokens[position] == "OR":
            position += 1
            value = both() or value
        return value

    try:
        return either() and position == len(tokens)
    except IndexError:  # not an SPDX expression
        return False


def _field(meta: metadata.PackageMetadata, key: str) -> str:
    values = meta.get_all(key) or []
    return str(values[0]).strip() if values else ""


def _verdict(dist: metadata.Distribution) -> str | None:
    """None for an accepted licence, else what the distribution declares."""
    meta = dist.metadata
    expression = _field(meta, "License-Expression")
    if expression:
        return None if _spdx_accepted(expression) else f"License-Expression {expression!r}"
    text = _field(meta, "License")
    classifiers = [
        c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")
    ]
    short = text if len(text) <= SHORT_LICENCE_FIELD and "\n" not in text else ""
    declared = [*filter(None, [short]), *classifiers]
    if any(COPYLEFT.search(item) for item in declared):
        return f"GPL-family licence {declared}"
    if (
        _spdx_accepted(short)
        or short.lower() in ACCEPTED_TEXT
        or any(c in ACCEPTED_CLASSIFIERS for c in classifiers)
    ):
        return None
    return f"unknown licence {declared or [text[:SHORT_LICENCE_FIELD]]}"


def _audit(roots: Iterable[Requirement], path: list[str]) -> list[str]:
    found, missing = _walk(roots, path)
    problems = [f"{requirement}: not installed" for requirement in missing]
    for name, dist in sorted(found.items()):
        if (verdict := _verdict(dist)) is not None:
            problems.append(f"{name} {dist.version}: {verdict}")
    return problems


def test_no_gpl_or_unknown_licence_among_runtime_dependencies() -> None:
    found, _ = _walk(_runtime_roots(), sys.path)
    assert {"torch", "ray", "flwr", "pydicom", "imagecodecs", "pylibjpeg-openjpeg"} <= set(found)
    assert _audit(_runtime_roots(), sys.path) == []


def _fake_distribution(site: Path, name: str, headers: str, requires: str = "") -> None:
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\n{headers}{requires}\n"
    )


def test_audit_names_a_gpl_distribution_and_an_unknown_licence(tmp_path: Path) -> None:
    """A root (pydicom's GPL JPEG plugin as it declares itself) and a transitive dependency
    with an unrecognised licence string are both reported, the MIT one is not."""
    _fake_distribution(
        tmp_path,
        "pylibjpeg-libjpeg",
        "License: GPL V3.0\n"
        "Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)\n",
        "Requires-Dist: fake-helper\nRequires-Dist: fake-docs; extra == 'docs'\n",
    )
    _fake_distribution(tmp_path, "fake-helper", "License: Proprietary-ish\n")
    _fake_distribution(tmp_path, "fake-docs", "License: GPL-2.0\n")
    _fake_distribution(tmp_path, "fake-mit", "License-Expression: MIT OR GPL-3.0-only\n")
    path = [str(tmp_path)]
    roots = [Requirement("pylibjpeg-libjpeg"), Requirement("fake-mit"), Requirement("fake-absent")]
    assert _audit(roots, path) == [
        "fake-absent: not installed",
        "fake-helper 1.0: unknown licence ['Proprietary-ish']",
        "pylibjpeg-libjpeg 1.0: GPL-family licence ['GPL V3.0', "
        "'GNU General Public License v3 (GPLv3)']",
    ]
    assert not _spdx_accepted("MIT AND GPL-3.0-or-later")
    assert _spdx_accepted("(MIT OR GPL-2.0) AND Apache-2.0 WITH LLVM-exception")
