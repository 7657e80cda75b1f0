"""Annotation formats users already have, read into ``(records, class_names)``.

- ``list``: mmaction2-style text lists. ``path label`` per line (a video file, or a folder of
  frames), or ``frame_dir total_frames label`` (rawframes). Paths are relative to ``root``.
  Class names come from ``labels_file`` (one name per line) or are the label numbers.
- ``kinetics``: the Kinetics CSVs, ``label,youtube_id,time_start,time_end,split``; a clip is
  ``{youtube_id}_{time_start:06d}_{time_end:06d}.{mp4,webm,mkv}`` in ``root`` or in
  ``root/{label}`` (spaces or underscores). Classes are the sorted label names, or
  ``labels_file``'s.
- ``ssv2``: Something-Something v2's JSON (``train.json``/``validation.json``, a list of
  ``{"id", "template", …}``) with ``labels_file`` = its ``labels.json`` (template → index);
  the label is the template without brackets; clips are ``root/{id}.webm``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("list", "kinetics", "ssv2")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi")


@dataclass(frozen=True)
class VideoRecord:
    path: str
    label: int


def load_annotations(
    fmt: str, annotation_file: str | Path, root: str | Path = ".", *, labels_file: str | Path | None = None,
    skip_missing: bool = False,
) -> tuple[list[VideoRecord], list[str]]:
    """Records (clip path, label index) and class names. Clips that do not exist raise
    ``FileNotFoundError`` naming the first few, unless ``skip_missing`` (Kinetics is usually
    incomplete) drops them."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    annotation_file, root = Path(annotation_file), Path(root)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"{fmt} annotation_file {str(annotation_file)!r} does not exist")
    if labels_file is not None and not Path(labels_file).is_file():
        raise FileNotFoundError(f"labels_file {str(labels_file)!r} does not exist")
    reader = {"list": _read_list, "kinetics": _read_kinetics, "ssv2": _read_ssv2}[fmt]
    records, classes = reader(annotation_file, root, labels_file)
    missing = [r.path for r in records if not Path(r.path).exists()]
    if missing and not skip_missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(records)} clips in {str(annotation_file)!r} do not exist, e.g. "
            f"{missing[:3]}; check root={str(root)!r}, or skip them (skip_missing=True, --skip-missing)"
        )
    if missing:
        absent = set(missing)
        records = [r for r in records if r.path not in absent]
    if not records:
        raise ValueError(f"annotation_file {str(annotation_file)!r} lists no usable clips")
    return records, classes


def _class_lines(labels_file) -> list[str] | None:
    if labels_file is None:
        return None
    return [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]


def _read_list(annotation_file: Path, root: Path, labels_file) -> tuple[list[VideoRecord], list[str]]:
    records = []
    for number, line in enumerate(annotation_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (2, 3) or not fields[-1].lstrip("-").isdigit():
            raise ValueError(
                f"{annotation_file}:{number}: expected 'path label' or 'frame_dir total_frames label', got {line!r}"
            )
        records.append(VideoRecord(str(root / fields[0]), int(fields[-1])))
    classes = _class_lines(labels_file) or [str(i) for i in range(max(r.label for r in records) + 1)]
    _check_labels(annotation_file, records, classes)
    return records, classes


def _read_kinetics(annotation_file: Path, root: Path, labels_file) -> tuple[list[VideoRecord], list[str]]:
    with annotation_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    needed = {"label", "youtube_id", "time_start", "time_end"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{annotation_file}: a Kinetics CSV needs the columns {sorted(needed)}")
    classes = _class_lines(labels_file) or sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for row in rows:
        if row["label"] not in index:
            raise ValueError(f"{annotation_file}: label {row['label']!r} is not in the class list")
        stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        folders = (root, root / row["label"], root / row["label"].replace(" ", "_"))
        candidates = [folder / (stem + suffix) for folder in folders for suffix in VIDEO_SUFFIXES]
        path = next((p for p in candidates if p.exists()), candidates[0])
        records.append(VideoRecord(str(path), index[row["label"]]))
    return records, classes


def _read_ssv2(annotation_file: Path, root: Path, labels_file) -> tuple[list[VideoRecord], list[str]]:
    if labels_file is None:
        raise ValueError("ssv2: labels_file (the dataset's labels.json) is required")
    template_index = {name: int(i) for name, i in json.loads(Path(labels_file).read_text()).items()}
    classes = [name for name, _ in sorted(template_index.items(), key=lambda item: item[1])]
    records = []
    for entry in json.loads(annotation_file.read_text()):
        if "template" not in entry:
            raise ValueError(f"{annotation_file}: entry {entry.get('id')!r} has no template (a test split?)")
        template = entry["template"].replace("[", "").replace("]", "")
        if template not in template_index:
            raise ValueError(f"{annotation_file}: template {template!r} is not in {labels_file}")
        records.append(VideoRecord(str(root / f"{entry['id']}.webm"), template_index[template]))
    return records, classes


def _check_labels(annotation_file: Path, records: list[VideoRecord], classes: list[str]) -> None:
    bad = [r.label for r in records if not 0 <= r.label < len(classes)]
    if bad:
        raise ValueError(f"{annotation_file}: labels must be in 0..{len(classes) - 1}, got {bad[0]}")


def flip_label_pairs(classes: list[str]) -> dict[int, int]:
    """Classes that a horizontal flip turns into each other: names equal after swapping the words
    "left" and "right" (SSv2's "Pushing something from left to right" ↔ "… right to left")."""
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
    index = {name: i for i, name in enumerate(classes)}
    pairs = {}
    for i, name in enumerate(classes):
        mirrored = " ".join(swap.get(word, word) for word in name.split(" "))
        if mirrored != name and mirrored in index:
            pairs[i] = index[mirrored]
    return pairs
