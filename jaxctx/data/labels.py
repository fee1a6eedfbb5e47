"""The label set of a labelled dataset: collected once from the train split, checked, saved beside the run.

Rules (model.num_labels = N, model.id2label = optional names):

    string labels / tags   ids are positions in model.id2label when it is set, else in the sorted set of the
                           train split's labels (sorted: the same ids whatever the file order); the set's size
                           must equal N
    integer labels / tags  used as ids directly; each must lie in [0, N); names from model.id2label or "0".."N-1"
    regression             one float per example; no label set (N must be 1)

Multi-label examples give a list of labels (strings or ids) each. The set is written to `labels.json` in the
workdir (`save_labels`) so `jaxctx predict` and exports can name the ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from jaxctx import storage
from jaxctx.data.errors import DataError

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelSet:
    """Label names in id order and how the data spells labels ("names": strings, "ids": integers, "values")."""

    names: tuple[str, ...]
    kind: str  # names | ids | values (regression)

    def to_json(self) -> dict:
        return {"names": list(self.names), "kind": self.kind}

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def _flat(column: Sequence[Any], nested: bool):
    """(example index, label) for every label in a column; nested = one list of labels per example."""
    for i, value in enumerate(column):
        if nested:
            if not isinstance(value, (list, tuple)):
                yield i, value  # reported as a kind error below
                continue
            for item in value:
                yield i, item
        else:
            yield i, value


def collect_labels(column: Sequence[Any], *, field: str, description: str, num_labels: int,
                   id2label: Sequence[str] | None, nested: bool, regression: bool = False) -> LabelSet:
    """The label set of one column of the train split (see the module docstring); DataError names the problem."""
    if regression:
        if num_labels != 1:
            raise DataError(f"regression predicts one value per example; model.num_labels={num_labels} should be 1")
        return LabelSet(("value",), "values")
    kinds = {}
    for index, value in _flat(column, nested):
        kind = "names" if isinstance(value, str) else "ids" if isinstance(value, int) and not isinstance(
            value, bool) else None
        if kind is None:
            want = "a list of labels" if nested else "a string or an integer class id"
            raise DataError(f"example {index} of {description}, column {field!r}: {value!r} is not {want}")
        kinds.setdefault(kind, index)
    if len(kinds) > 1:
        raise DataError(f"column {field!r} of {description} mixes string labels (example {kinds['names']}) and "
                        f"integer ids (example {kinds['ids']}); use one kind")
    kind = next(iter(kinds), "ids")
    if kind == "ids":
        for index, value in _flat(column, nested):
            if not 0 <= value < num_labels:
                raise DataError(f"example {index} of {description}, column {field!r}: label id {value} is outside "
                                f"[0, model.num_labels={num_labels}); raise model.num_labels or fix the data")
        names = tuple(id2label) if id2label else tuple(str(i) for i in range(num_labels))
        return LabelSet(names, "ids")
    if id2label:
        known = set(id2label)
        for index, value in _flat(column, nested):
            if value not in known:
                raise DataError(f"example {index} of {description}, column {field!r}: label {value!r} is not in "
                                f"model.id2label ({', '.join(id2label)})")
        return LabelSet(tuple(id2label), "names")
    names = tuple(sorted({value for _, value in _flat(column, nested)}))
    if len(names) != num_labels:
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise DataError(f"model.num_labels={num_labels} but column {field!r} of {description} has {len(names)} "
                        f"distinct labels ({shown}); set model.num_labels={len(names)}")
    return LabelSet(names, "names")


def save_labels(workdir: str, labels: LabelSet, extra: dict | None = None) -> str:
    """Write `labels.json` into `workdir` (local or gs://, atomically); refuse if one there names other labels."""
    path = storage.join(workdir, LABELS_FILE)
    record = {**labels.to_json(), **(extra or {})}
    if storage.exists(path):
        old = load_labels(path)
        if old.names != labels.names:
            raise DataError(f"{path} names the labels {list(old.names)} but the data now gives {list(labels.names)};"
                            f" use a new workdir for other labels")
    storage.write_atomic(path, json.dumps(record, indent=1))
    return path


def load_labels(path: str) -> LabelSet:
    """A LabelSet from a `labels.json` file (or a workdir holding one), local or gs://."""
    if storage.isdir(path):
        path = storage.join(path, LABELS_FILE)
    try:
        record = json.loads(storage.read_text(path))
        return LabelSet(tuple(record["names"]), record["kind"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read the label set {path}: {err}") from None
