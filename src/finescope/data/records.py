"""The plain sample record every source produces and every split, dataset and metric reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One image.

    Attributes:
        path: absolute path of the image file.
        label: class index into :attr:`SampleSet.class_names`.
        group: patient / specimen / source id; samples of one group never sit on two sides of a split.
        meta: extra fields such as ``{"magnification": 100, "subtype": "adenosis", "patient": "22549AB"}``.
    """

    path: str
    label: int
    group: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def patient(self) -> str:
        """The patient that patient-level metrics score: ``meta['patient']`` where the source names one (BreakHis:
        the patient folder, 22549AB, while the group is its case number 22549, shared with 22549CD), else the group."""
        return str(self.meta.get("patient") or self.group)


@dataclass(frozen=True)
class SampleSet:
    """The samples of one source with its class names, in a deterministic (sorted) order.

    Attributes:
        samples: the records, sorted by path.
        class_names: names of the classes; ``label`` indexes this list.
        root: the folder the source read (paths in splits files are stored relative to it).
        skipped: files that could not be used (unreadable, truncated), with the reason, when
            ``data.on_error: skip``.
        preset_splits: for a CSV manifest with a ``split`` column, that column (train/val/test per sample).
        manifest: the CSV manifest read (``csv`` and ``synthetic`` sources; ``root`` is then its folder, which its
            relative paths are read from), else empty.
        group_column: the manifest's column the groups come from (``group``, else ``patient``); empty for other
            sources and for a manifest of neither column (each image its own group).
    """

    samples: list[Sample]
    class_names: list[str]
    root: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    preset_splits: list[str] | None = None
    manifest: str = ""
    group_column: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def groups(self) -> list[str]:
        return [s.group for s in self.samples]
