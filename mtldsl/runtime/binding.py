"""Data binding and placement: a spec + a dataset -> the checked spec, the generated class and the splits cut to it.

Takes spec text, a data source and a device; gives `Prepared` (`prepare`: the spec checked against the
schema of the data it really reads, its generated module class, the objective, and the train/val/test
splits holding only the model's columns and the label products, on the device or streamed to it: Note
[Streamed batches] in data.py), plus the checks evaluate/predict run on other data than trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..diagnostics import SpecError
from ..pipeline import Checked, check_text, spec_labels
from .config import ConfigError
from .objective import Objective

__all__ = ["DEVICE_DATA_SHARE", "Prepared", "check_columns", "check_spec", "check_vocab", "data_fits", "instantiate",
           "list_fields", "prepare", "spec_input", "unread_lists", "vocab_sizes", "weighted_fields"]

DEVICE_DATA_SHARE = 0.5  # splits move to an accelerator whole up to this share of its free memory, else stream


@dataclass
class Prepared:
    """A spec checked against a dataset, its generated source, and the dataset's splits cut to the model."""

    checked: Checked
    objective: Objective
    source: str
    cls: type
    dataset: Any  # runtime.data.Dataset
    splits: dict[str, Any]  # name -> data.Split with the model's columns and the objective's label products


def spec_input(spec: str | Path | Checked) -> tuple[str, str]:
    if isinstance(spec, Checked):
        return spec.source.text, spec.source.path
    from ..sources import SpecNotFound, decode, locate

    try:
        found = locate(spec)  # a file, or a packaged spec by bare name
    except SpecNotFound as e:
        raise ConfigError(f"{spec}: {e.problem}") from None
    src, problem = decode(found.data, found.path)
    if problem is not None:
        raise SpecError([problem])
    return src.text, found.path


def _check_against(text: str, path: str, schema: Any) -> Checked:
    checked = check_text(text, path, schema=schema)
    if not checked.ok:
        raise SpecError(checked.diagnostics)
    assert checked.model is not None and checked.graph is not None
    return checked


def _same_fields(a: Any, b: Any) -> bool:
    return (a.labels, a.sparse, a.dense, dict(a.groups), a.lists, dict(a.list_weights)) == \
        (b.labels, b.sparse, b.dense, dict(b.groups), b.lists, dict(b.list_weights))


def list_fields(cls: type) -> tuple[str, ...]:
    """The list fields a generated class reads (a model without any declares no LIST_FIELDS: Note [List fields])."""
    return tuple(getattr(cls, "LIST_FIELDS", ()))


def weighted_fields(cls: type) -> tuple[str, ...]:
    """The list fields whose weights a generated class reads (WEIGHTED_FIELDS, declared only with lists)."""
    return tuple(getattr(cls, "WEIGHTED_FIELDS", ()))


def _cut(split: Any, cls: type, objective: Objective) -> Any:
    """The split with only the model's columns, in its order (no copy: the same column files or arrays), whose
    batches carry the objective's label products (computed per batch, on the host). A list field keeps its
    weights only when the model reads them (WEIGHTED_FIELDS), so a batch holds exactly the model's inputs."""
    weighted = set(weighted_fields(cls))
    return replace(
        split,
        sparse_cols={f: split.sparse_cols[f] for f in cls.SPARSE_FIELDS},
        dense_cols={f: split.dense_cols[f] for f in cls.DENSE_FIELDS},
        list_cols={f: split.list_cols[f] if f in weighted else replace(split.list_cols[f], weights=None)
                   for f in list_fields(cls)},
        products=dict(objective.columns),
        truth_cols=None,
    )


def data_fits(nbytes: int | Callable[[], int], device: torch.device, free: int | None = None) -> bool:
    """Whether splits of `nbytes` may move to `device` whole (Note [Streamed batches]): always on a CPU; on an
    accelerator when they take at most DEVICE_DATA_SHARE of its free memory (`free`, else asked of the device).

    `nbytes` may be a function giving it, called only for an accelerator: Split.nbytes scans the rows of
    list-table fields (Note [List tables] in store.py), work a CPU run does not need."""
    if device.type == "cpu":
        return True
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return (nbytes() if callable(nbytes) else nbytes) <= DEVICE_DATA_SHARE * free


def _place(splits: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the splits to `device` when they fit there, else leave them on the host, streaming batches to it."""
    if data_fits(lambda: sum(split.nbytes for split in splits.values()), device):
        return {name: split.to(device) for name, split in splits.items()}
    return {name: replace(split, stream_to=device) for name, split in splits.items()}


def check_columns(cls: type, dataset: Any, source: str) -> None:
    """The generated module's columns exist in the dataset (evaluate/predict on other data than trained on)."""
    from .data import DataError

    schema = dataset.schema
    missing = [f for f in cls.SPARSE_FIELDS if f not in schema.sparse] + \
              [f for f in cls.DENSE_FIELDS if f not in schema.dense] + \
              [f for f in list_fields(cls) if f not in schema.lists] + \
              [f for f in weighted_fields(cls) if f not in schema.list_weights]
    if missing:
        cols = ", ".join(f"'{c}'" for c in missing)
        raise DataError(f"{source}: the model reads column(s) {cols}, which the dataset does not have")


def check_vocab(cls: type, dataset: Any, split: str, vocab: Mapping[str, int]) -> None:
    """Ids beyond the trained vocabulary would read another field's rows: refuse them by column and row."""
    from .data import DataError

    data = dataset.split(split)
    for f in (*cls.SPARSE_FIELDS, *list_fields(cls)):
        found = data.first_at_least(f, vocab[f])  # read in runs of rows, never the whole column
        if found is not None:
            i, value = found
            raise DataError(f"{dataset.source}: {split} split, column '{f}', row {i + 1}: id {value} is outside "
                            f"the model's vocabulary (size {vocab[f]}, from the data it was trained on)")


def check_spec(text: str, path: str, *, data: str | None, data_dir: str | None) -> tuple[Checked, str, Any]:
    """The spec checked against the schema of the data it will really read, that data source, and the schema.

    Lowering against the real schema (not only the spec's `data` line) makes `fields all` resolve there
    and turns a field or label the dataset lacks into a positioned SpecError, before any data is loaded.
    """
    from ..catalog import schema_for

    if data is None:  # the spec's own `data` line
        first = check_text(text, path, data_dir=data_dir)
        if not first.ok:
            raise SpecError(first.diagnostics)
        assert first.model is not None
        data = first.model.data
    schema = schema_for(data, data_dir, spec_labels=spec_labels(text, path))
    return _check_against(text, path, schema), data, schema


def prepare(text: str, path: str, *, data: str | None, data_dir: str | None, rows: int | None, data_seed: int,
            device: torch.device, source: str | None = None,
            checked: tuple[Checked, str, Any] | None = None, hash_ids: int | None = None) -> Prepared:
    """Check the spec against the dataset (check_spec), load the data, compile (or reuse `source`), cut the splits."""
    from .. import compile_spec, load_module
    from ..codegen import class_name
    from .data import load_dataset, only_lists

    spec, data, schema = checked or check_spec(text, path, data=data, data_dir=data_dir)
    assert spec.model is not None
    objective = Objective(spec.model)

    def compiled(spec: Checked, source: str | None) -> tuple[str, type]:
        assert spec.model is not None
        source = compile_spec(spec) if source is None else source
        module = load_module(source, f"mtldsl_{spec.model.name}")
        return source, getattr(module, class_name(spec.model.name))

    given = source  # a run's saved source is used as it is
    source, cls = compiled(spec, given)  # before loading: only the lists it reads are loaded (Note [Unread lists])
    dataset = load_dataset(data, data_dir=data_dir, rows=rows, seed=data_seed, binary_labels=objective.binary_columns,
                           schema=schema, hash_ids=hash_ids, lists=list_fields(cls))
    if not _same_fields(dataset.schema, only_lists(schema, list_fields(cls))):  # e.g. inferred differently on load
        spec = _check_against(text, path, dataset.schema)
        assert spec.model is not None
        objective = Objective(spec.model)
        source, cls = compiled(spec, given)
    check_columns(cls, dataset, dataset.source)
    unread = unread_lists(cls, schema)
    if unread:
        dataset.warnings = (*dataset.warnings, unread)  # printed without progress output too, kept in metrics.json
    splits = _place({name: _cut(dataset.split(name), cls, objective)
                     for name in ("train", "val", "test")}, device)
    return Prepared(spec, objective, source, cls, dataset, splits)


def unread_lists(cls: type, schema: Any) -> str | None:
    """A notice when the data has list fields the model does not read (Note [Ali-CCP lists]), else None."""
    unread = [f for f in schema.lists if f not in list_fields(cls)]
    if not unread:
        return None
    return (f"data: the model reads none of the list field(s) {', '.join(unread)} (`fields all` is the single-valued "
            "fields; Note [Ali-CCP lists]): a table such as `embedding beh shared { dim 16  fields lists  pool sum }` "
            "reads them" + (", or `mtldsl data prepare ali_ccp --last-entry` keeps each list's last id as a "
                            "single-valued field" if schema.name == "ali_ccp" else ""))


def instantiate(cls: type, vocab: Mapping[str, int], seed: int, device: torch.device,
                 sparse_grad: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(dict(vocab), sparse_grad=sparse_grad)
    return model.to(device)


def vocab_sizes(cls: type, schema: Any) -> dict[str, int]:
    if schema.vocab_sizes is None:
        raise ConfigError(f"dataset '{schema.name}' has no vocabulary sizes")
    return {f: int(schema.vocab_sizes[f]) for f in (*cls.SPARSE_FIELDS, *list_fields(cls))}


