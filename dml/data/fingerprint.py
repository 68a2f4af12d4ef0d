"""A fingerprint of a run's data (class names, file list and sizes), so that ``--resume`` can refuse data
that changed since the run started, and say what changed."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from .datasets import DatasetError, Splits

_SPLITS = ("train", "val", "test")


def data_fingerprint(splits: Splits) -> dict[str, Any]:
    """Class names, files (relative to the data's common folder) and file sizes of every split.

    Paths are relative, so a dataset moved to another folder keeps its fingerprint; a file replaced by
    one of another size, renamed, added or removed changes it.

    Args:
        splits: the loaded splits.

    Returns:
        ``{"dataset", "digest", "splits": {name: {"classes": [...], "files": [[path, size, label], ...]}}}``
        (JSON-serialisable).

    Raises:
        DatasetError: if a file cannot be read (it vanished after the split was made).
    """
    paths = [p for name in _SPLITS for p in getattr(splits, name).paths]
    root = os.path.commonpath(paths) if paths else ""
    if len(paths) == 1:
        root = os.path.dirname(root)
    described: dict[str, Any] = {}
    for name in _SPLITS:
        split = getattr(splits, name)
        files = []
        for path, label in zip(split.paths, split.labels):
            try:
                size = os.path.getsize(path)
            except OSError as err:
                raise DatasetError(f"cannot read {path}: {err.strerror}") from None
            files.append([os.path.relpath(path, root) if root else path, size, label])
        described[name] = {"classes": list(split.class_names), "files": files}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return {"dataset": splits.name, "digest": digest, "splits": described}


def _names(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def data_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two `data_fingerprint` results, one short phrase per split that changed.

    Args:
        old: the fingerprint saved with the run.
        new: the fingerprint of the data now.

    Returns:
        Phrases such as ``"test: classes removed: a, b; 11 images fewer"`` (empty when they agree).
    """
    if old.get("digest") == new.get("digest"):
        return []
    if old.get("dataset") != new.get("dataset"):
        return [f"dataset {old.get('dataset')} → {new.get('dataset')}"]
    changes = []
    for name in _SPLITS:
        before, now = old["splits"][name], new["splits"][name]
        parts = []
        gone = [c for c in before["classes"] if c not in set(now["classes"])]
        added = [c for c in now["classes"] if c not in set(before["classes"])]
        if gone:
            parts.append(f"classes removed: {_names(gone)}")
        if added:
            parts.append(f"classes added: {_names(added)}")
        files_before = {f[0]: f[1] for f in before["files"]}
        files_now = {f[0]: f[1] for f in now["files"]}
        count = len(files_now) - len(files_before)
        if count:
            parts.append(f"{abs(count)} images {'more' if count > 0 else 'fewer'}")
        resized = sum(1 for p, size in files_now.items() if p in files_before and files_before[p] != size)
        if resized:
            parts.append(f"{resized} files of another size")
        renamed = len(set(files_now) ^ set(files_before))
        if renamed and not count and not gone and not added:
            parts.append(f"{renamed} file names differ")
        if not parts and before != now:
            parts.append("the assignment of images to classes differs")
        if parts:
            changes.append(f"{name}: " + "; ".join(parts))
    return changes or ["the file list differs"]
