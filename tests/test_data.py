"""catalog.py (schemas, folders, messages) and runtime/data.py (loading, checks, synthetic data, batches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtldsl import catalog
from mtldsl.catalog import DataError, DatasetNotFound, UnknownGroup, field_group, schema_for
from mtldsl.runtime import data as data_mod
from mtldsl.runtime.data import Split, load_dataset, synthetic_truth
from mtldsl.runtime.metrics import auc

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FOLDERS = {"ali_ccp": "ali-ccp", "census_income": "census-income", "aliexpress": "aliexpress"}
ROWS = 100_000

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared samples not at {SHARED}")


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Named datasets must not be found in the developer's own ~/.mtldsl/data or $MTLDSL_DATA."""
    monkeypatch.delenv("MTLDSL_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


# --- catalog --------------------------------------------------------------------------------------


def test_catalog_imports_neither_torch_nor_pandas() -> None:
    code = "import mtldsl.catalog, sys; assert 'torch' not in sys.modules and 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_named_schemas_need_no_files() -> None:
    ali = schema_for("ali_ccp")
    assert ali.labels == ("click", "purchase")
    assert len(ali.sparse) == 23 and not any(f.startswith("D") for f in ali.sparse)
    assert ali.dense == ("D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853")
    assert ali.user_id == "101" and ali.vocab_sizes is None
    assert field_group(ali, "item") == ("205", "206", "207", "210", "216")
    user = field_group(ali, "user")
    assert user[:9] == ("101", "121", "122", "124", "125", "126", "127", "128", "129")
    assert set(user[9:]) == {"109_14", "110_14", "127_14", "150_14"}
    assert set(field_group(ali, "context")) == {"508", "509", "702", "853", "301"}
    assert field_group(ali, "all") == field_group(ali, "sparse") == ali.sparse
    assert field_group(ali, "dense") == ali.dense and field_group(ali, "none") == ()

    census = schema_for("census_income")
    assert census.labels == ("income", "marital status") and census.user_id is None
    assert census.dense == (
        "age",
        "wage per hour",
        "capital gains",
        "capital losses",
        "divdends from stocks",
        "num persons worked for employer",
        "weeks worked in year",
    )
    assert len(census.sparse) == 32 and "year" in census.sparse

    ali_x = schema_for("aliexpress")
    assert ali_x.labels == ("click", "conversion") and ali_x.user_id == "search_id"
    assert "search_id" not in ali_x.sparse and len(ali_x.sparse) == 16 and len(ali_x.dense) == 63

    syn = schema_for("synthetic")
    assert (syn.labels, syn.sparse, syn.dense, dict(syn.groups)) == (ali.labels, ali.sparse, ali.dense, dict(ali.groups))
    assert syn.vocab_sizes is not None and set(syn.vocab_sizes) == set(syn.sparse)
    assert set(catalog.KNOWN_DATASETS) == {"synthetic", "ali_ccp", "census_income", "aliexpress"}


def test_unknown_group_lists_known_ones() -> None:
    with pytest.raises(UnknownGroup) as e:
        field_group(schema_for("census_income"), "user")
    assert str(e.value) == "dataset 'census_income' has no field group 'user' (known: all, sparse, dense, none)"
    assert isinstance(e.value, KeyError)


@needs_shared
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_named_schema_matches_sample_header(name: str) -> None:
    folder = SHARED / FOLDERS[name]
    header = pd.read_csv(next(folder.glob("*_train_sample.csv")), nrows=0).columns
    schema = schema_for(name)
    assert set(schema.columns) == set(header)
    assert [c for c in header if c in schema.sparse] == list(schema.sparse)  # file order
    assert schema_for(str(folder)) is schema  # a folder with a named dataset's header gets its schema


def test_inferred_schema(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("user_id,item_id,price,click,watch\n3,7,0.5,1,0\n4,8,1.25,0,1\n5,9,2.0,1,0\n")
    (tmp_path / "test.csv").write_text("user_id,item_id,price,click,watch\n3,9,0.5,0,1\n")
    schema = schema_for(str(tmp_path))
    assert schema.name == tmp_path.name
    assert (schema.labels, schema.sparse, schema.dense, schema.user_id) == (
        ("click",),
        ("user_id", "item_id", "watch"),
        ("price",),
        "user_id",
    )
    assert schema.groups == {"all": schema.sparse, "user": ("user_id",), "item": ("item_id",)}
    assert schema_for(str(tmp_path), labels=["click", "watch"]).labels == ("click", "watch")
    assert not (tmp_path / "schema.json").exists()  # catalog never writes

    ds = load_dataset(str(tmp_path), labels=["click", "watch"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv", "train.csv"]  # Note [The user's folder]
    assert schema_for(str(tmp_path)).labels == ("click",)  # inferred again, not read back from a saved file
    assert ds.schema.vocab_sizes == {"user_id": 6, "item_id": 10}
    assert ds.val_from_train and len(ds.val) == 1 and len(ds.train) == 2


def test_inference_without_labels_says_how_to_name_them(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no label column found .* name the label columns in the spec "
                                        r"\(`task <name> binary label <column>`\) or in .*schema\.json \(\"labels\"\)"):
        schema_for(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "source", "prepare"),
    [
        ("ali_ccp", 'Tianchi dataset 408 "Alibaba Click and Conversion Prediction"', "mtldsl data prepare ali_ccp --raw DIR"),
        ("census_income", "UCI KDD census-income", None),
        ("aliexpress", "Tianchi dataset 74690", None),
    ],
)
def test_missing_named_dataset_says_where_and_how(tmp_path: Path, name: str, source: str, prepare: str | None) -> None:
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(name, data_dir=tmp_path)
    message = str(e.value)
    assert message.startswith(f"dataset '{name}' (")
    assert f"  {tmp_path / name}\n" in message  # where it looked
    assert str(Path.home() / ".mtldsl" / "data" / name) in message
    assert source in message and "expected layout: train/val/test" in message
    if prepare:
        assert f"`{prepare}`" in message
    else:  # no converter exists: the message must not promise one
        assert "data prepare" not in message


def test_folder_name_under_data_dir(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.csv").write_text("uid,click\n1,1\n2,0\n")
    (tmp_path / "mine" / "test.csv").write_text("uid,click\n1,0\n")
    assert schema_for("mine", tmp_path).sparse == ("uid",)
    assert len(load_dataset("mine", data_dir=tmp_path).test) == 1
    with pytest.raises(DataError, match="dataset 'ali_ccp' has fixed labels click, purchase"):
        load_dataset("ali_ccp", data_dir=tmp_path, labels=["click"])


def test_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="no dataset 'nope': not a folder and not one of synthetic, ali_ccp"):
        load_dataset("nope")
    with pytest.raises(DatasetNotFound, match="no train file"):
        schema_for(str(tmp_path))


# --- shared samples -------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_shared_sample_loads(name: str) -> None:
    schema = schema_for(name)
    ds = load_dataset(name, data_dir=SHARED, binary_labels=schema.labels)
    folder = SHARED / FOLDERS[name]
    assert Path(ds.source) == folder
    frames = {s: pd.read_csv(p) for s, p in catalog.find_split_files(folder, name).items()}
    if name == "aliexpress":
        assert "val" not in frames and ds.val_from_train
        assert (len(ds.train), len(ds.val)) == (90, 10) and "held out 10 of 100" in ds.notes[0]
    else:
        assert not ds.val_from_train and len(ds.val) == len(frames["val"])
        assert len(ds.train) == len(frames["train"])
    assert len(ds.test) == len(frames["test"])
    for split in (ds.train, ds.val, ds.test):
        n = len(split)
        assert split.sparse.dtype == torch.int64 and split.sparse.shape == (n, len(schema.sparse))
        assert split.dense.dtype == torch.float32 and split.dense.shape == (n, len(schema.dense))
        assert set(split.labels) == set(schema.labels)
        assert all(y.dtype == torch.float32 and y.shape == (n,) for y in split.labels.values())
        assert all(bool(((y == 0) | (y == 1)).all()) for y in split.labels.values())
        assert (split.groups is None) == (schema.user_id is None)
    everything = pd.concat(frames.values())
    assert ds.schema.vocab_sizes == {f: int(everything[f].max()) + 1 for f in schema.sparse}
    assert list(ds.schema.vocab(schema.sparse)) == [ds.schema.vocab_sizes[f] for f in schema.sparse]
    test = frames["test"]
    np.testing.assert_array_equal(ds.test.sparse.numpy(), test[list(schema.sparse)].to_numpy())
    np.testing.assert_allclose(ds.test.dense.numpy(), test[list(schema.dense)].to_numpy(), rtol=1e-6)
    if schema.user_id is not None:
        assert ds.test.groups is not None
        np.testing.assert_array_equal(ds.test.groups.numpy(), test[schema.user_id].to_numpy())


@needs_shared
def test_rows_caps_each_file() -> None:
    ds = load_dataset("ali_ccp", data_dir=SHARED, rows=7)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 7, 7)


@needs_shared
def test_folder_path_and_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "ali"
    folder.mkdir()
    for split in ("train", "val", "test"):
        df = pd.read_csv(SHARED / "ali-ccp" / f"ali_ccp_{split}_sample.csv")
        df.to_parquet(folder / f"{split}.parquet")
    ds = load_dataset(str(folder))
    ref = load_dataset("ali_ccp", data_dir=SHARED)
    assert ds.schema.sparse == ref.schema.sparse and ds.schema.vocab_sizes == ref.schema.vocab_sizes
    assert torch.equal(ds.train.sparse, ref.train.sparse) and torch.equal(ds.test.dense, ref.test.dense)
    assert not (folder / "schema.json").exists()  # a named dataset's schema is not re-saved


# --- bad data -------------------------------------------------------------------------------------

SCHEMA = {"name": "toy", "labels": ["click"], "sparse": ["uid", "item"], "dense": ["price"], "user_id": "uid"}
GOOD = "uid,item,price,click\n1,2,0.5,0\n2,3,0.25,1\n3,4,1.0,0\n"


def _folder(tmp_path: Path, train: str, *, schema: dict[str, object] = SCHEMA) -> Path:
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "test.csv").write_text(GOOD)
    return tmp_path


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ("uid,item,click\n1,2,0\n", "missing column 'price' (needed by the 'toy' schema)"),
        ("uid,click\n1,0\n", "missing columns 'item', 'price' (needed by the 'toy' schema)"),
        ("uid,item,price,click\n1,2,0.5,0\n2,3,n/a,1\n", "column 'price', row 2: expected a number, got 'n/a'"),
        ("uid,item,price,click\n1,2,0.5,0\n2,3,0.1,1\n3,4,nan,0\n", "column 'price', row 3: expected a finite number, got nan"),
        ("uid,item,price,click\n1,2,inf,0\n", "column 'price', row 1: expected a finite number, got inf"),
        ("uid,item,price,click\n1,2,0.5,0\n2,3,,1\n", "column 'price', row 2: missing value"),
        ("uid,item,price,click\n1,2,0.5,0\n2,-3,0.5,1\n", "column 'item', row 2: expected a non-negative integer id, got -3"),
        ("uid,item,price,click\n1,2.5,0.5,0\n", "column 'item', row 1: expected an integer id, got 2.5"),
        ("uid,item,price,click\n1,2,0.5,0\nabc,2,0.5,0\n", "column 'uid', row 2: expected an integer id, got 'abc'"),
        ("uid,item,price,click\n1,2,0.5,0\n1,2,0.5,2\n", "column 'click', row 2: expected a binary label 0 or 1, got 2"),
        ("uid,item,price,click\n1,2,0.5,yes\n", "column 'click', row 1: expected a number, got 'yes'"),
        ("", "empty file"),
        ("uid,item,price,click\n", "no data rows"),
    ],
)
def test_bad_csv(tmp_path: Path, train: str, message: str) -> None:
    folder = _folder(tmp_path, train)
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), binary_labels=["click"])
    assert str(e.value) == f"{folder / 'train.csv'}: {message}"


def test_label_range_is_checked_only_for_binary_labels(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "uid,item,price,click\n1,2,0.5,3.5\n2,2,0.5,0\n")
    ds = load_dataset(str(folder))  # a regression target: any finite number
    assert max(float(ds.train.labels["click"].max()), float(ds.val.labels["click"].max())) == 3.5
    with pytest.raises(DataError, match="binary label"):
        load_dataset(str(folder), binary_labels=["click"])
    with pytest.raises(DataError, match="binary label\\(s\\) 'clk' are not label columns"):
        load_dataset(str(folder), binary_labels=["clk"])


def test_bad_parquet(tmp_path: Path) -> None:
    folder = _folder(tmp_path, GOOD)
    (folder / "train.csv").unlink()
    pd.DataFrame({"uid": [1, 2], "item": [3, 4], "price": [0.5, float("nan")], "click": [0, 1]}).to_parquet(folder / "train.parquet")
    with pytest.raises(DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == f"{folder / 'train.parquet'}: column 'price', row 2: expected a finite number, got nan"


def test_named_dataset_error_names_file_column_row(tmp_path: Path) -> None:
    folder = tmp_path / "ali_ccp"
    folder.mkdir()
    schema = schema_for("ali_ccp")
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        df = pd.DataFrame({c: rng.integers(0, 3, 50) for c in schema.sparse})
        for c in schema.dense:
            df[c] = rng.random(50).round(3)
        df["click"] = rng.integers(0, 2, 50)
        df["purchase"] = df["click"] * rng.integers(0, 2, 50)
        if split == "train":
            df["D509"] = df["D509"].astype(object)
            df.loc[41, "D509"] = "n/a"
        df.to_csv(folder / f"{split}.csv", index=False)
    with pytest.raises(DataError) as e:
        load_dataset("ali_ccp", data_dir=tmp_path)
    assert str(e.value) == f"{folder / 'train.csv'}: column 'D509', row 42: expected a number, got 'n/a'"


def test_declared_vocab_sizes_are_enforced(tmp_path: Path) -> None:
    folder = _folder(tmp_path, GOOD, schema={**SCHEMA, "vocab_sizes": {"uid": 10, "item": 4}})
    with pytest.raises(DataError) as e:
        load_dataset(str(folder))
    assert str(e.value) == f"{folder / 'train.csv'}: column 'item', row 3: id 4 is outside the declared vocabulary size 4"


def test_bad_schema_json(tmp_path: Path) -> None:
    folder = _folder(tmp_path, GOOD, schema={**SCHEMA, "labls": ["click"]})
    with pytest.raises(DataError, match=r"schema\.json: unknown key\(s\) 'labls'"):
        schema_for(str(folder))


# --- synthetic ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> data_mod.Dataset:
    return load_dataset("synthetic", rows=ROWS, seed=0)


def _all(ds: data_mod.Dataset, fn: object) -> np.ndarray:
    return np.concatenate([fn(s) for s in (ds.train, ds.val, ds.test)])  # type: ignore[operator]


def test_synthetic_shapes_and_vocab(synthetic: data_mod.Dataset) -> None:
    ds = synthetic
    assert (len(ds.train), len(ds.val), len(ds.test)) == (80_000, 10_000, 10_000)
    assert ds.source == "synthetic" and ds.schema == schema_for("synthetic")
    assert ds.train.sparse.dtype == torch.int64 and ds.train.dense.dtype == torch.float32
    sparse = _all(ds, lambda s: s.sparse.numpy())
    assert (sparse >= 0).all()
    assert (sparse.max(axis=0) < np.array(ds.schema.vocab(ds.schema.sparse))).all()
    dense = _all(ds, lambda s: s.dense.numpy())
    assert np.isfinite(dense).all() and dense.min() >= 0 and dense.max() <= 1
    assert torch.equal(ds.test.groups, ds.test.sparse[:, 0])  # gAUC by user id (field 101)


def test_synthetic_is_deterministic_by_seed(synthetic: data_mod.Dataset) -> None:
    again = load_dataset("synthetic", rows=ROWS, seed=0)
    other = load_dataset("synthetic", rows=ROWS, seed=1)
    assert torch.equal(again.train.sparse, synthetic.train.sparse)
    assert torch.equal(again.test.dense, synthetic.test.dense)
    assert torch.equal(again.val.labels["click"], synthetic.val.labels["click"])
    assert not torch.equal(other.train.sparse, synthetic.train.sparse)


def test_synthetic_positive_rates(synthetic: data_mod.Dataset) -> None:
    click = _all(synthetic, lambda s: s.labels["click"].numpy())
    purchase = _all(synthetic, lambda s: s.labels["purchase"].numpy())
    assert set(np.unique(click)) == {0, 1} and set(np.unique(purchase)) == {0, 1}
    assert 0.04 <= click.mean() <= 0.08
    assert 0.10 <= purchase[click == 1].mean() <= 0.20
    assert 0.005 <= purchase.mean() <= 0.01
    assert (purchase <= click).all()  # purchase implies click


def test_synthetic_has_hundreds_of_rows_per_id(synthetic: data_mod.Dataset) -> None:
    sparse = _all(synthetic, lambda s: s.sparse.numpy())
    for field in ("101", "205"):  # user id, item id
        ids = sparse[:, synthetic.schema.sparse.index(field)]
        assert len(ids) / len(np.unique(ids)) >= 150, field
        assert len(np.unique(ids)) == synthetic.schema.vocab_sizes[field]  # every id occurs


def test_synthetic_truth_matches_the_splits(synthetic: data_mod.Dataset) -> None:
    truth = synthetic_truth(ROWS, seed=0)
    assert synthetic.test.truth is not None
    np.testing.assert_allclose(synthetic.test.truth["p_click"].numpy(), truth["p_click"][90_000:], rtol=1e-6)
    np.testing.assert_allclose(truth["p_purchase"], truth["p_click"] * truth["p_purchase_given_click"])


def test_synthetic_bayes_auc(synthetic: data_mod.Dataset) -> None:
    truth = {k: torch.from_numpy(v) for k, v in synthetic_truth(ROWS, seed=0).items()}
    click = torch.from_numpy(_all(synthetic, lambda s: s.labels["click"].numpy()))
    purchase = torch.from_numpy(_all(synthetic, lambda s: s.labels["purchase"].numpy()))
    assert 0.75 <= auc(truth["p_click"], click) <= 0.85
    assert auc(truth["p_purchase"], purchase) >= 0.8
    clicked = click == 1
    assert auc(truth["p_purchase_given_click"][clicked], purchase[clicked]) >= 0.75


def test_synthetic_has_conflicting_users() -> None:
    truth = synthetic_truth(ROWS, seed=0)
    conflict = truth["conflict"] == 1
    assert 0.25 <= conflict.mean() <= 0.45
    corr = np.corrcoef(truth["click_affinity"][conflict], truth["purchase_affinity"][conflict])[0, 1]
    corr_rest = np.corrcoef(truth["click_affinity"][~conflict], truth["purchase_affinity"][~conflict])[0, 1]
    assert corr < -0.5 and corr_rest > 0.5


# --- batches --------------------------------------------------------------------------------------


def _toy_split(n: int) -> Split:
    idx = torch.arange(n)
    return Split.from_tensors(
        sparse=torch.stack([idx, idx % 3], dim=1),
        dense=idx.to(torch.float32)[:, None],
        labels={"click": (idx % 2).to(torch.float32)},
        groups=idx % 5,
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_row_once(shuffle: bool) -> None:
    split = _toy_split(1003)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # two epochs
        batches = list(split.batches(100, shuffle=shuffle, generator=g))
        assert [len(b["sparse"]) for b in batches] == [100] * 10 + [3]
        rows = torch.cat([b["sparse"][:, 0] for b in batches])
        assert sorted(rows.tolist()) == list(range(1003))
        assert (rows.tolist() == list(range(1003))) != shuffle
        for b in batches:  # every tensor of a batch describes the same rows
            r = b["sparse"][:, 0]
            assert torch.equal(b["dense"][:, 0], r.float())
            assert torch.equal(b["labels"]["click"], (r % 2).float()) and torch.equal(b["groups"], r % 5)


def test_batches_shuffle_is_seeded_and_drop_last() -> None:
    split = _toy_split(250)
    first = [b["sparse"][:, 0] for b in split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(3))]
    again = [b["sparse"][:, 0] for b in split.batches(64, shuffle=True, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert [len(b["sparse"]) for b in split.batches(64, shuffle=False, drop_last=True)] == [64, 64, 64]
    no_groups = Split.from_tensors(split.sparse, split.dense, split.labels, None)
    assert next(no_groups.batches(8, shuffle=True))["groups"] is None
    assert len(split) == 250 and len(split.take(torch.tensor([4, 2]))) == 2


# --- Note [Streamed batches] --------------------------------------------------------------------------


def _batches_equal(a: list[dict], b: list[dict]) -> bool:
    def same(x: object, y: object) -> bool:
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if x is None or y is None:
            return x is None and y is None
        return torch.equal(x, y)  # type: ignore[arg-type]

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def test_streamed_split_yields_the_resident_batches() -> None:
    import dataclasses

    from mtldsl.runtime.distributed import shard_batches

    split = load_dataset("synthetic", rows=2000, seed=0).train
    streamed = dataclasses.replace(split, stream_to=torch.device("cpu"))
    assert streamed.nbytes == split.nbytes > 0
    for shuffle in (False, True):
        kw = dict(shuffle=shuffle, generator=torch.Generator().manual_seed(3))
        a = list(split.batches(300, **kw))  # type: ignore[arg-type]
        b = list(streamed.batches(300, shuffle=shuffle, generator=torch.Generator().manual_seed(3)))
        assert len(a) == 6 and _batches_equal(a, b)
    for rank in (0, 1):
        a = list(shard_batches(split, 256, rank, 2, torch.Generator().manual_seed(1)))
        b = list(shard_batches(streamed, 256, rank, 2, torch.Generator().manual_seed(1)))
        assert a and _batches_equal(a, b)


def test_data_moves_to_an_accelerator_only_when_it_fits() -> None:
    from mtldsl.runtime.trainer import DEVICE_DATA_SHARE, data_fits

    assert data_fits(10**15, torch.device("cpu"))  # host memory is where the rows already are
    free = 1000
    fits = int(DEVICE_DATA_SHARE * free)
    assert data_fits(fits, torch.device("cuda"), free) and not data_fits(fits + 1, torch.device("cuda"), free)
    asked: list[int] = []

    def size() -> int:  # as binding passes Split.nbytes: a scan, left undone on a CPU
        asked.append(1)
        return fits + 1

    assert data_fits(size, torch.device("cpu")) and not asked
    assert not data_fits(size, torch.device("cuda"), free) and asked == [1]


def test_training_on_streamed_batches_equals_resident_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtldsl.runtime import binding, trainer

    spec = Path(__file__).resolve().parents[1] / "specs" / "shared_bottom.mtl"
    kw = dict(rows=1200, epochs=1, batch_size=256, seed=2, progress=False, device="cpu", precision="fp32")
    resident = trainer.train(spec, out=tmp_path / "resident", **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(binding, "data_fits", lambda nbytes, device, free=None: False)
    delivered = []
    deliver = Split._deliver

    def counting(self: Split, t: torch.Tensor) -> torch.Tensor:
        delivered.append(self.stream_to)
        return deliver(self, t)

    monkeypatch.setattr(Split, "_deliver", counting)
    streamed = trainer.train(spec, out=tmp_path / "streamed", **kw)  # type: ignore[arg-type]
    assert delivered and all(d == torch.device("cpu") for d in delivered)  # every batch went through the stream
    a, b = resident.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.metrics["tasks"] == resident.metrics["tasks"]


@pytest.mark.parametrize(("n", "batch_size", "world"), [(1001, 100, 1), (1002, 100, 1), (401, 100, 2), (403, 100, 2),
                                                        (7, 1, 1), (9, 2, 2), (1000, 100, 1)])
def test_a_remainder_of_one_row_is_not_a_training_batch(n: int, batch_size: int, world: int) -> None:
    # Note [Remainder batch]: the counts the loop resumes by equal what the batches yield, with and without DDP
    from mtldsl.runtime.data import MIN_TRAIN_ROWS, train_batch_count
    from mtldsl.runtime.distributed import batches_per_epoch, rows_per_epoch, shard_batches

    split = _toy_split(n)
    if world == 1:
        sizes = [len(b["sparse"]) for b in split.batches(batch_size, shuffle=True, min_rows=MIN_TRAIN_ROWS,
                                                         generator=torch.Generator().manual_seed(0))]
        assert len(sizes) == train_batch_count(n, batch_size) == batches_per_epoch(n, batch_size, 1)
    else:
        shards = [[len(b["sparse"]) for b in shard_batches(split, batch_size, r, world, torch.Generator().manual_seed(0))]
                  for r in range(world)]
        assert shards[0] == shards[1] and len(shards[0]) == batches_per_epoch(n, batch_size, world)
        sizes = [s * world for s in shards[0]]
    assert sum(sizes) == rows_per_epoch(n, batch_size, world)
    assert batch_size == 1 or min(sizes) >= MIN_TRAIN_ROWS * world
