"""Dataset names and folders -> Schema (labels, sparse, list and dense fields, field groups, gAUC id).

Used by `mtldsl check/compile` to resolve `fields all` / `fields user` at compile time, so it imports
neither torch nor pandas: named datasets have fixed schemas written here, folders are read with the
stdlib `csv`/`json` modules through datafiles.py (a Parquet folder without `schema.json` loads pyarrow lazily). This module
never writes, and nothing writes an inferred schema into a data folder (Note [The user's folder]).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .datafiles import DataError, is_data_file, read_sample, unreadable

__all__ = [
    "ALI_CCP_LISTS",
    "DataError",
    "DatasetInfo",
    "DatasetNotFound",
    "KNOWN_DATASETS",
    "KNOWN_LABELS",
    "LIST_ROW",
    "MAX_VOCAB",
    "SPLITS",
    "SYNTHETIC_VOCAB",
    "Schema",
    "UnknownGroup",
    "data_roots",
    "field_group",
    "find_split_files",
    "infer_schema",
    "known_groups",
    "list_table_path",
    "locate",
    "named",
    "resolve_folder",
    "schema_for",
    "schema_from_json",
    "schema_to_json",
]

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
DATA_SUFFIXES = (".parquet", ".csv", ".csv.gz")
# Column names taken as labels when a folder's schema is inferred and no labels are given.
KNOWN_LABELS = ("click", "purchase", "conversion", "income", "marital status", "label", "ctr", "cvr")
# Column names taken as the gAUC group id when a folder's schema is inferred.
KNOWN_GROUP_IDS = ("user_id", "userid", "uid", "search_id", "session_id")
INFER_ROWS = 5000
MAX_VOCAB = 1 << 27  # rows of one field's embedding table (Note [Vocabulary bound] in runtime/datacheck.py)
SCHEMA_FILE = "schema.json"
_INT = re.compile(r"[+-]?\d+")
_SPECIAL_GROUPS = ("all", "sparse", "dense", "none")
LISTS_GROUP = "lists"  # every list field (Note [List fields] in runtime/layers.py); named only when the data has some


class DatasetNotFound(FileNotFoundError):
    """A named dataset or a folder is absent; the message says where it was looked for and how to get it."""

    def __str__(self) -> str:  # FileNotFoundError would print "(errno) None" otherwise
        return str(self.args[0]) if self.args else ""


class UnknownGroup(KeyError):
    """A field group the schema does not define; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Schema:
    name: str
    labels: tuple[str, ...]  # label columns (0/1 for binary tasks)
    sparse: tuple[str, ...]  # categorical id columns, in file/column order
    dense: tuple[str, ...]  # numeric columns
    groups: Mapping[str, tuple[str, ...]]  # e.g. {"user": (...), "item": (...)}; always has "all" (= sparse)
    user_id: str | None  # the gAUC group column (may or may not be a feature)
    vocab_sizes: Mapping[str, int] | None = None  # max id + 1 per sparse and list field; known after loading data
    lists: tuple[str, ...] = ()  # list-valued id columns (a list of ids per row), apart from the single-valued sparse
    list_weights: Mapping[str, str] = field(default_factory=dict)  # list field -> its weights column (weighted lists)
    hashed: Mapping[str, int] = field(default_factory=dict)  # field -> buckets, ids modulo (Note [Vocabulary bound])
    list_rows: str | None = None  # the lists live in list tables; this column gives each row's (Note [List tables])

    def __post_init__(self) -> None:
        if "all" not in self.groups:
            object.__setattr__(self, "groups", {"all": self.sparse, **self.groups})

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the loader needs from a split file: labels, sparse, lists and their weights (or the list
        row: Note [List tables]), dense and the group id, without repeats."""
        extra = (self.user_id,) if self.user_id else ()
        lists = (self.list_rows,) if self.list_rows else self.list_columns
        return tuple(dict.fromkeys((*self.labels, *self.sparse, *lists, *self.dense, *extra)))

    @property
    def list_columns(self) -> tuple[str, ...]:
        """The list fields and their weights columns."""
        return (*self.lists, *(self.list_weights[f] for f in self.lists if f in self.list_weights))

    def vocab(self, fields: Sequence[str]) -> tuple[int, ...]:
        """Vocabulary sizes of `fields`, in that order (for a FusedEmbedding)."""
        if self.vocab_sizes is None:
            raise ValueError(f"schema '{self.name}' has no vocabulary sizes yet: load the data first")
        return tuple(self.vocab_sizes[f] for f in fields)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    title: str
    schema: Schema
    file_prefix: str  # torch-rechub's sample layout: <prefix>_<split>_sample.csv
    folder_names: tuple[str, ...]  # accepted folder names under a data root
    source: str  # where to get the raw files
    prepare: str | None  # the command that turns raw files into the folder layout
    has_val: bool = True
    note: str = field(default="", compare=False)


# --- named datasets --------------------------------------------------------------------------------

_ALI_CCP_USER = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
_ALI_CCP_BEHAVIOUR = ("109_14", "110_14", "127_14", "150_14")
_ALI_CCP_ITEM = ("205", "206", "207", "210", "216")
_ALI_CCP_CONTEXT = ("508", "509", "702", "853", "301")
# File/column order of the Ali-CCP sample (and of the synthetic dataset).
_ALI_CCP_SPARSE = (*_ALI_CCP_USER, *_ALI_CCP_ITEM, "508", "509", "702", "853", "301", *_ALI_CCP_BEHAVIOUR)
_ALI_CCP_DENSE = ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")


# Vocabulary sizes of the synthetic dataset (runtime/data.py generates ids below these).
SYNTHETIC_VOCAB: dict[str, int] = {
    "101": 500,  # user id
    "121": 8,  # user segment (noisy)
    "122": 14,  # gender x age group
    "124": 2,  # gender
    "125": 7,  # age group
    "126": 3,  # consumption level (activity)
    "127": 3,  # shopping depth
    "128": 2,  # occupation (noisy sign of the purchase preference)
    "129": 4,  # city level
    "205": 250,  # item id
    "206": 20,  # category
    "207": 60,  # shop
    "210": 40,  # intention node (category x 2)
    "216": 80,  # brand (category x 4)
    "508": 160,  # segment x category
    "509": 70,  # age x brand bucket
    "702": 64,  # hashed user x item noise
    "853": 80,  # city level x category
    "301": 3,  # context (position bucket)
    "109_14": 20,  # favourite clicked category
    "110_14": 20,  # favourite purchased category
    "127_14": 80,  # favourite brand
    "150_14": 40,  # favourite intention node
}


def _ali_ccp_schema(name: str, vocab_sizes: Mapping[str, int] | None = None) -> Schema:
    return Schema(
        name=name,
        labels=("click", "purchase"),
        sparse=_ALI_CCP_SPARSE,
        dense=_ALI_CCP_DENSE,
        groups={
            "all": _ALI_CCP_SPARSE,
            "user": (*_ALI_CCP_USER, *_ALI_CCP_BEHAVIOUR),
            "user_profile": _ALI_CCP_USER,
            "user_behaviour": _ALI_CCP_BEHAVIOUR,
            "item": _ALI_CCP_ITEM,
            "context": _ALI_CCP_CONTEXT,
            "user_id": ("101",),
            "item_id": ("205",),
        },
        user_id="101",
        vocab_sizes=vocab_sizes,
    )


# Note [Ali-CCP lists]
# The behaviour fields 109_14, 110_14, 127_14 and 150_14 are lists of (id, value) entries. `mtldsl data
# prepare ali_ccp` keeps them whole by default (list fields, their values as the weights `<f>_w`, once per
# common-features line in list tables: Note [List tables] in runtime/store.py); with `--last-entry` it keeps
# only each list's last id, as torch-rechub does, and they stay single-valued.
# So the named dataset has two schemas: ALI_CCP_LISTS when the prepared folder's schema.json declares list
# fields (with its `list_rows`: a folder prepared before list tables has the lists inline), else the
# single-valued one (also when no folder is present, so `check`/`compile` need no files).
# `fields all` means the single-valued fields on every dataset (docs/language.md, List fields), so on a
# full-list folder a spec saying `fields all` does not read the four behaviour id lists (their D<f>
# values stay: they are dense columns). That is said, not silent: training warns (without progress output
# too; metrics.json keeps it) which list fields the model does not read and how to read them
# (binding.unread_lists). Reading them needs a table with
# `pool`, which the validator refuses on data without lists (synthetic), and the shipped specs must run
# on synthetic, so they keep `fields all`; a spec for the full lists adds e.g.
# `embedding beh shared { dim 16  fields lists  pool sum }`, and `--last-entry` gives the shipped specs
# the torch-rechub features exactly.

_CENSUS_DENSE = (
    "age",
    "wage per hour",
    "capital gains",
    "capital losses",
    "divdends from stocks",
    "num persons worked for employer",
    "weeks worked in year",
)
_CENSUS_SPARSE = (
    "class of worker",
    "industry code",
    "occupation code",
    "education",
    "enrolled in edu inst last wk",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "tax filer status",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veterans admin",
    "veterans benefits",
    "year",
)
_ALIEXPRESS_SPARSE = tuple(f"categorical_{i}" for i in range(1, 17))
_ALIEXPRESS_DENSE = tuple(f"numerical_{i}" for i in range(1, 64))

_TIANCHI = "https://tianchi.aliyun.com/dataset/"


def _ali_ccp_lists_schema(name: str) -> Schema:
    """Ali-CCP with whole behaviour lists (Note [Ali-CCP lists]): the behaviour fields are weighted list fields."""
    base = _ali_ccp_schema(name)
    sparse = tuple(f for f in base.sparse if f not in _ALI_CCP_BEHAVIOUR)
    return replace(base, sparse=sparse, groups={**base.groups, "all": sparse}, lists=_ALI_CCP_BEHAVIOUR,
                   list_weights={f: f"{f}_w" for f in _ALI_CCP_BEHAVIOUR})


ALI_CCP_LISTS = _ali_ccp_lists_schema("ali_ccp")

KNOWN_DATASETS: dict[str, DatasetInfo] = {
    "synthetic": DatasetInfo(
        name="synthetic",
        title="Synthetic Ali-CCP-shaped data with planted task-conflicting preferences",
        schema=_ali_ccp_schema("synthetic", SYNTHETIC_VOCAB),
        file_prefix="synthetic",
        folder_names=(),
        source="built in: generated on the fly by mtldsl.runtime.data",
        prepare=None,
    ),
    "ali_ccp": DatasetInfo(
        name="ali_ccp",
        title="Ali-CCP, Alibaba Click and Conversion Prediction",
        schema=_ali_ccp_schema("ali_ccp"),
        file_prefix="ali_ccp",
        folder_names=("ali_ccp", "ali-ccp"),
        source=f'Tianchi dataset 408 "Alibaba Click and Conversion Prediction" ({_TIANCHI}408)',
        prepare="mtldsl data prepare ali_ccp --raw DIR",
    ),
    "census_income": DatasetInfo(
        name="census_income",
        title="UCI Census-Income (KDD)",
        schema=Schema(
            name="census_income",
            labels=("income", "marital status"),
            sparse=_CENSUS_SPARSE,
            dense=_CENSUS_DENSE,
            groups={"all": _CENSUS_SPARSE},
            user_id=None,
        ),
        file_prefix="census_income",
        folder_names=("census_income", "census-income"),
        source="UCI KDD census-income (https://archive.ics.uci.edu/dataset/117/census+income+kdd)",
        prepare=None,  # published preprocessed in the layout below; no raw converter
    ),
    "aliexpress": DatasetInfo(
        name="aliexpress",
        title="AliExpress search logs (AliExpress_NL and friends)",
        schema=Schema(
            name="aliexpress",
            labels=("click", "conversion"),
            sparse=_ALIEXPRESS_SPARSE,
            dense=_ALIEXPRESS_DENSE,
            groups={"all": _ALIEXPRESS_SPARSE},
            user_id="search_id",  # gAUC per search; not a feature
        ),
        file_prefix="aliexpress",
        folder_names=("aliexpress",),
        source=f"Tianchi dataset 74690 ({_TIANCHI}74690)",
        prepare=None,  # the Tianchi CSVs are already in the layout below
        has_val=False,
        note="no validation split: 10% of train is held out as val",
    ),
}


def _normalise_name(source: str) -> str | None:
    key = source.strip().lower().replace("-", "_")
    return key if key in KNOWN_DATASETS else None


# --- field groups ---------------------------------------------------------------------------------


def known_groups(schema: Schema) -> tuple[str, ...]:
    lists = (LISTS_GROUP,) if schema.lists else ()
    return tuple(dict.fromkeys((*_SPECIAL_GROUPS, *lists, *schema.groups)))


def field_group(schema: Schema, group: str) -> tuple[str, ...]:
    """The fields of a named group: all/sparse (the single-valued fields), lists, dense, none, or one of the
    schema's groups (which may hold list fields too)."""
    if group in ("all", "sparse"):
        return schema.sparse
    if group == "dense":
        return schema.dense
    if group == "none":
        return ()
    if group == LISTS_GROUP and (schema.lists or LISTS_GROUP not in schema.groups):
        return schema.lists
    try:
        return tuple(schema.groups[group])
    except KeyError:
        known = ", ".join(known_groups(schema))
        raise UnknownGroup(f"dataset '{schema.name}' has no field group '{group}' (known: {known})") from None


# --- folders --------------------------------------------------------------------------------------


def data_roots(data_dir: str | Path | None = None) -> list[Path]:
    """Where named datasets are looked for, in order: data_dir, $MTLDSL_DATA, ~/.mtldsl/data."""
    roots = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get("MTLDSL_DATA")
    if env:
        roots.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    roots.append(Path.home() / ".mtldsl" / "data")
    return list(dict.fromkeys(roots))


def find_split_files(folder: Path, prefix: str | None = None) -> dict[str, Path]:
    """The data file of each split present in `folder` (train.csv / train.parquet / <prefix>_train_sample.csv …).

    Two files for one split (train.csv beside train.parquet) are refused, naming both: one would win silently.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    for split, aliases in SPLIT_ALIASES.items():
        candidates: list[Path] = []
        for alias in aliases:
            for suffix in DATA_SUFFIXES:
                candidates.append(folder / f"{alias}{suffix}")
                if prefix:
                    candidates.append(folder / f"{prefix}_{alias}_sample{suffix}")
                    candidates.append(folder / f"{prefix}_{alias}{suffix}")
        hits = list(dict.fromkeys(c for c in candidates if is_data_file(c)))
        if not hits:  # any single <something>_<split>[_sample].<suffix>
            hits = sorted(
                p
                for alias in aliases
                for suffix in DATA_SUFFIXES
                for pattern in (f"*_{alias}{suffix}", f"*_{alias}_sample{suffix}")
                for p in folder.glob(pattern)
                if is_data_file(p)
            )
        if len(hits) > 1:
            names = ", ".join(sorted(p.name for p in hits))
            raise DataError(f"{folder}: several {split} files ({names}): keep one of them, as it is not clear "
                            "which one to read")
        if hits:
            found[split] = hits[0]
    return found


def resolve_folder(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder of a named dataset, or DatasetNotFound saying where it was looked for and how to get it."""
    key = _normalise_name(name)
    if key is None:
        known = ", ".join(KNOWN_DATASETS)
        raise DatasetNotFound(f"unknown dataset '{name}': not a folder and not one of {known}")
    info = KNOWN_DATASETS[key]
    if not info.folder_names:
        raise DatasetNotFound(f"dataset '{key}' is built in and has no folder")
    looked: list[Path] = []
    for root in data_roots(data_dir):
        for folder_name in info.folder_names:
            folder = root / folder_name
            looked.append(folder)
            if folder.is_dir() and "train" in find_split_files(folder, info.file_prefix):
                return folder
    where = "\n".join(f"  {p}" for p in looked)
    layout = f"train/val/test (.csv or .parquet) or {info.file_prefix}_{{train,val,test}}_sample.csv"
    prepare = f"\nthen run `{info.prepare}` to write the folder" if info.prepare else ""
    raise DatasetNotFound(
        f"dataset '{key}' ({info.title}) not found; looked for a train file in:\n{where}\n"
        f"expected layout: {layout}\n"
        f"get the raw files from {info.source}{prepare}\n"
        f"(data folders are looked for under the data directory given, $MTLDSL_DATA or ~/.mtldsl/data)"
    )


# --- schema.json ----------------------------------------------------------------------------------


def schema_to_json(schema: Schema, *, with_vocab: bool = False) -> str:
    data: dict[str, object] = {
        "name": schema.name,
        "labels": list(schema.labels),
        "sparse": list(schema.sparse),
        "dense": list(schema.dense),
        "groups": {k: list(v) for k, v in schema.groups.items()},
        "user_id": schema.user_id,
    }
    if schema.lists:
        data["lists"] = list(schema.lists)
    if schema.list_weights:
        data["list_weights"] = dict(schema.list_weights)
    if schema.list_rows:
        data["list_rows"] = schema.list_rows
    if schema.hashed:
        data["hash_ids"] = dict(schema.hashed)
    if with_vocab and schema.vocab_sizes is not None:
        data["vocab_sizes"] = dict(schema.vocab_sizes)
    return json.dumps(data, indent=2) + "\n"


def schema_from_json(text: str, *, path: str | Path = SCHEMA_FILE, default_name: str = "data") -> Schema:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    known = {"name", "labels", "sparse", "dense", "groups", "user_id", "vocab_sizes", "lists", "list_weights",
             "list_rows", "hash_ids"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")

    def names(key: str) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}: '{key}' must be a list of column names")
        return tuple(value)

    sparse = names("sparse")
    lists = names("lists")
    for other in ("sparse", "dense", "labels"):
        both = [f for f in lists if f in names(other)]
        if both:
            raise DataError(f"{path}: {', '.join(map(repr, both))} in both 'lists' and '{other}': a field is one or the other")
    for other in ("sparse", "dense"):
        both = [f for f in names(other) if f in names("labels")]
        if both:
            raise DataError(f"{path}: {', '.join(map(repr, both))} in both 'labels' and '{other}': a label is never "
                            "a feature (it would leak into the inputs)")
    taken = {*sparse, *lists, *names("dense"), *names("labels")}
    list_weights = _list_weights(data.get("list_weights", {}), lists, taken, path)
    list_rows = _list_rows(data.get("list_rows"), lists, {*taken, *list_weights.values()}, path)
    groups_raw = data.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise DataError(f"{path}: 'groups' must map group names to lists of sparse fields")
    groups: dict[str, tuple[str, ...]] = {"all": sparse}
    for g, members in groups_raw.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise DataError(f"{path}: group '{g}' must be a list of column names")
        if g == LISTS_GROUP and lists:
            raise DataError(f"{path}: group '{LISTS_GROUP}' is every list field; name your group otherwise")
        missing = [m for m in members if m not in sparse and m not in lists]
        if missing and g != "all":
            kinds = "sparse or list fields" if lists else "sparse fields"
            raise DataError(f"{path}: group '{g}' lists {', '.join(map(repr, missing))}, not {kinds}")
        groups[g] = tuple(members) if g != "all" else sparse
    user_id = data.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise DataError(f"{path}: 'user_id' must be a column name or null")
    vocab = data.get("vocab_sizes")
    if vocab is not None:
        if not isinstance(vocab, dict) or not all(isinstance(v, int) and v > 0 for v in vocab.values()):
            raise DataError(f"{path}: 'vocab_sizes' must map sparse fields to positive integers")
        missing = [f for f in (*sparse, *lists) if f not in vocab]
        if missing:
            raise DataError(f"{path}: 'vocab_sizes' lacks {', '.join(map(repr, missing))}")
    hashed = data.get("hash_ids", {})
    if not isinstance(hashed, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_VOCAB
                                               for v in hashed.values()):
        raise DataError(f"{path}: 'hash_ids' must map sparse fields to bucket counts from 1 to {MAX_VOCAB}")
    unhashable = [f for f in hashed if f not in sparse]
    if unhashable:
        raise DataError(f"{path}: 'hash_ids' names {', '.join(map(repr, unhashable))}, not in 'sparse'")
    name = data.get("name", default_name)
    labels = names("labels")
    if not labels:
        raise DataError(f"{path}: 'labels' is empty: name the label columns")
    return Schema(
        name=str(name),
        labels=labels,
        sparse=sparse,
        dense=names("dense"),
        groups=groups,
        user_id=user_id,
        vocab_sizes=dict(vocab) if vocab is not None else None,
        lists=lists,
        list_weights=list_weights,
        hashed=dict(hashed),
        list_rows=list_rows,
    )


def _list_rows(value: object, lists: tuple[str, ...], taken: set[str], path: str | Path) -> str | None:
    """schema.json's 'list_rows': the column giving each row's row of its list table (Note [List tables])."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: 'list_rows' must be a column name (each row's row of its list table) or null")
    if not lists:
        raise DataError(f"{path}: 'list_rows' is set but 'lists' is empty: a list table holds list fields")
    if value in taken:
        raise DataError(f"{path}: 'list_rows' names '{value}', which is a field, label or weights column already")
    return value


def _list_weights(value: object, lists: tuple[str, ...], taken: set[str], path: str | Path) -> dict[str, str]:
    """schema.json's 'list_weights': each list field's weights column, checked."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DataError(f"{path}: 'list_weights' must map list fields to weight column names")
    for f, column in value.items():
        if f not in lists:
            raise DataError(f"{path}: 'list_weights' names '{f}', which is not in 'lists'")
        if column in taken:
            raise DataError(f"{path}: 'list_weights' gives '{f}' the weights column '{column}', which is a field or "
                            "label already: a weights column holds only weights")
    columns = list(value.values())
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise DataError(f"{path}: 'list_weights' uses the weights column(s) {', '.join(map(repr, repeated))} twice")
    return dict(value)


# --- inference ------------------------------------------------------------------------------------


def _column_kind(values: list[str]) -> str:
    """'float' when some sampled value is a number that is not an integer literal, else 'int' when some value is an
    integer, else 'other'. Cells that are not numbers do not decide the kind (a stray 'n/a' in a price column
    keeps it dense), so the loader names them as what the column holds: a bad number, a bad id."""
    kind = "other"
    for v in values:
        v = v.strip()
        if _INT.fullmatch(v):
            kind = "int" if kind == "other" else kind
            continue
        try:
            float(v)
        except ValueError:
            continue
        kind = "float"
    return kind


def _label_columns(path: Path, header: list[str], labels: Sequence[str] | None, spec_labels: Sequence[str]) -> tuple[str, ...]:
    """Which header columns are labels: `labels` when given, else the spec's label columns and the known label
    names (Note [Inferred labels])."""
    if labels is not None:
        missing = [c for c in labels if c not in header]
        if missing:
            raise DataError(f"{path}: label column(s) {', '.join(map(repr, missing))} not in the header")
        return tuple(labels)
    found = tuple(c for c in header if c in spec_labels or c.lower() in KNOWN_LABELS)
    if not found and not spec_labels:  # with a spec, its checker positions each label the header lacks
        raise DataError(
            f"{path}: no label column found (looked for {', '.join(KNOWN_LABELS)}); name the label columns in the "
            f"spec (`task <name> binary label <column>`) or in {path.parent / SCHEMA_FILE} (\"labels\")"
        )
    return found


# Note [Inferred labels]
# A folder without schema.json gets its schema from the train file's header and first INFER_ROWS rows.
# Its labels are every column the spec names in a label or `where` expression (tasks, outputs, losses,
# label products included), plus every column with a known label name (click, purchase, label, ...):
# such a column is never made a feature, even when the spec does not use it, so a label cannot leak into
# the inputs by being unused. A label the spec names but the header lacks is left to the spec's checker,
# which positions it in the spec. With schema.json the file decides, and a column the spec names as a label that
# schema.json lists as a feature is an error, never a silent override (schema_for).


def infer_schema(folder: str | Path, *, labels: Sequence[str] | None = None, rows: int = INFER_ROWS,
                 spec_labels: Sequence[str] = ()) -> Schema:
    """A schema from the train file's header and first rows.

    A header equal to a named dataset's columns gets that dataset's schema. Otherwise labels are `labels`,
    or the spec's label columns and the known label names present (Note [Inferred labels]); integer-valued
    columns are sparse, other numeric columns dense; a column named like user_id/search_id is the gAUC id
    (and stays a feature).
    """
    folder = Path(folder)
    files = find_split_files(folder)
    if "train" not in files:
        raise DatasetNotFound(f"{folder}: no train file (train.csv, train.parquet, train.csv.gz or *_train_sample.csv)")
    path = files["train"]
    header, sample = read_sample(path, rows)
    if labels is None:
        for info in KNOWN_DATASETS.values():
            if info.name != "synthetic" and set(header) == set(info.schema.columns):
                return info.schema
    label_cols = _label_columns(path, header, labels, spec_labels)
    user_id = next((c for c in header if c.lower() in KNOWN_GROUP_IDS and c not in label_cols), None)
    lists, list_weights, list_rows = _inferred_lists(path, header)
    listed = {*lists, *list_weights.values(), *((list_rows,) if list_rows else ())}
    sparse: list[str] = []
    dense: list[str] = []
    for j, col in enumerate(header):
        if col in label_cols or col in listed:
            continue
        values = [r[j] for r in sample if j < len(r)]
        # Columns without a number are listed as sparse so the loader names the first bad value.
        (dense if _column_kind(values) == "float" else sparse).append(col)
    groups: dict[str, tuple[str, ...]] = {"all": tuple(sparse)}
    for side in ("user", "item"):
        members = tuple(c for c in sparse if c.lower().startswith(side))
        if members:
            groups[side] = members
    return Schema(
        name=folder.resolve().name or "data",
        labels=label_cols,
        sparse=tuple(sparse),
        dense=tuple(dense),
        groups=groups,
        user_id=user_id,
        lists=lists,
        list_weights=list_weights,
        list_rows=list_rows,
    )


LIST_ROW = "list_row"  # the column an inferred schema takes as the list-table row (Note [List tables])


def list_table_path(path: Path) -> Path:
    """The list table of split file `path`: `<stem>.lists.parquet` beside it (Note [List tables] in runtime/store.py)."""
    return path.with_name(f"{path.name.rsplit('.', 1)[0]}.lists.parquet")


def _inferred_lists(path: Path, header: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str], str | None]:
    """The list fields, their weights and the list-table column of a folder without schema.json: from the train
    file's list columns, or from its list table, which its `list_row` column points into."""
    table = list_table_path(path)
    if not table.is_file():
        return (*_parquet_lists(path), None) if path.suffix == ".parquet" else ((), {}, None)
    lists, weights = _parquet_lists(table)
    if LIST_ROW not in header or not lists:
        lacks = f"{path} has no '{LIST_ROW}' column" if LIST_ROW not in header else f"{table} has no list<int> column"
        raise DataError(f"{table} is a list table, but {lacks}: name the list fields and the column that points "
                        f"into the table ('lists', 'list_rows') in {path.parent / SCHEMA_FILE}")
    return lists, weights, LIST_ROW


WEIGHT_SUFFIXES = ("_w", "_weight", "_weights")  # `<field><suffix>`: the weights of list field <field>


def _parquet_lists(path: Path) -> tuple[tuple[str, ...], dict[str, str]]:
    """The list fields of a Parquet file (list<integer> columns) and their weights: a list<float> column named
    `<field>_w`, `<field>_weight` or `<field>_weights` (Note [List columns] in runtime/store.py)."""
    import pyarrow as pa  # lazy, as in _read_sample
    import pyarrow.parquet as pq

    types = {f.name: f.type for f in pq.ParquetFile(path).schema_arrow}
    kinds = {c: t.value_type for c, t in types.items()
             if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)}
    lists = tuple(c for c, v in kinds.items() if pa.types.is_integer(v))
    weights: dict[str, str] = {}
    for col, v in kinds.items():
        if col in lists:
            continue
        owner = next((col[:-len(x)] for x in WEIGHT_SUFFIXES if col.endswith(x) and col[:-len(x)] in lists), None)
        if not pa.types.is_floating(v) or owner is None or owner in weights:
            raise DataError(f"{path}: column '{col}' holds lists of {v}: a list column is a list field (list<int>) or "
                            f"its weights (list<float> named '<field>_w'); say which in {path.parent / SCHEMA_FILE}")
        weights[owner] = col
    return lists, weights


def named(source: str) -> str | None:
    """The KNOWN_DATASETS key `source` names ("ali-ccp" -> "ali_ccp"), or None for a path or an unknown name."""
    if "/" in source or os.sep in source:  # a name beats a same-named folder; a path never names
        return None
    return _normalise_name(source)


def locate(source: str, data_dir: str | Path | None = None) -> Path:
    """The folder of a non-named source: the path itself, else <root>/<source> under the data roots."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not path.is_absolute():
        for root in data_roots(data_dir):
            if (root / source).is_dir():
                return root / source
    known = ", ".join(KNOWN_DATASETS)
    raise DatasetNotFound(f"no dataset '{source}': not a folder and not one of {known}")


def _named_schema(key: str, data_dir: str | Path | None) -> Schema:
    """A named dataset's schema; for ali_ccp, the whole-lists one when its folder was prepared so (Note [Ali-CCP lists])."""
    schema = KNOWN_DATASETS[key].schema
    if key != "ali_ccp":
        return schema
    try:
        declared = json.loads((resolve_folder(key, data_dir) / SCHEMA_FILE).read_text(encoding="utf-8"))
    except (DatasetNotFound, OSError, ValueError):
        return schema  # no folder (yet), or no readable schema.json: the single-valued layout
    if not isinstance(declared, dict) or not declared.get("lists"):
        return schema
    rows = declared.get("list_rows")  # lists kept once per common line (Note [List tables] in runtime/store.py)
    return replace(ALI_CCP_LISTS, list_rows=rows) if isinstance(rows, str) and rows else ALI_CCP_LISTS


def schema_for(source: str, data_dir: str | Path | None = None, *, labels: Sequence[str] | None = None,
               spec_labels: Sequence[str] = ()) -> Schema:
    """The schema of a named dataset (fixed, no files needed) or of a folder (schema.json, else inferred).

    A folder is `source` itself or, for a relative path, `<root>/<source>` under data_roots(data_dir).
    `spec_labels`: the columns the spec names as labels (Note [Inferred labels]).
    """
    key = named(source)
    if key is not None:
        schema = _named_schema(key, data_dir)
        if labels is not None and tuple(labels) != schema.labels:
            raise DataError(f"dataset '{key}' has fixed labels {', '.join(schema.labels)}; labels apply to folders")
        return schema
    path = locate(source, data_dir)
    schema_file = path / SCHEMA_FILE
    if is_data_file(schema_file):
        try:
            text = schema_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise unreadable(schema_file, e, 0) from None
        schema = schema_from_json(text, path=schema_file, default_name=path.resolve().name)
        if labels is not None and tuple(labels) != schema.labels:
            raise DataError(f"{schema_file}: labels are {', '.join(schema.labels)}; edit the file to change them")
        for c in spec_labels:
            kind = next((k for k, cols in (("sparse", schema.sparse), ("dense", schema.dense), ("lists", schema.lists))
                         if c in cols), None)
            if kind is not None:
                raise DataError(f"{schema_file}: column '{c}' is a label in the spec but listed in '{kind}' here; "
                                f"move it to 'labels' (a label is never a feature)")
        return schema
    return infer_schema(path, labels=labels, spec_labels=spec_labels)
