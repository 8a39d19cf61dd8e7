"""A small Parquet folder with list columns (tests/data/shop's schema), for the list-field data tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHOP = Path(__file__).resolve().parent / "data" / "shop"
VOCAB = {"user_id": 40, "item_id": 30, "city": 5, "clicked_items": 30, "tags": 12, "109_14": 25}


def _lists(rng: np.random.Generator, n: int, vocab: int, most: int) -> list[list[int]]:
    return [rng.integers(0, vocab, rng.integers(0, most + 1)).tolist() for _ in range(n)]


def shop_table(n: int, seed: int) -> pa.Table:
    """n rows of the shop schema: clicks depend on the clicked items' ids (so the lists carry signal)."""
    rng = np.random.default_rng(seed)
    clicked = _lists(rng, n, VOCAB["clicked_items"], 5)
    weights = [(rng.random(len(x)) + 0.5).astype(np.float32).tolist() for x in clicked]
    score = np.array([sum(i % 3 == 0 for i in x) - 0.7 for x in clicked]) + rng.normal(0, 0.5, n)
    click = (score > 0).astype(np.int8)
    return pa.table({
        "click": click,
        "purchase": (click & (rng.random(n) < 0.4)).astype(np.int8),
        "user_id": rng.integers(0, VOCAB["user_id"], n),
        "item_id": rng.integers(0, VOCAB["item_id"], n),
        "city": rng.integers(0, VOCAB["city"], n),
        "price": rng.random(n).astype(np.float32),
        "clicked_items": pa.array(clicked, pa.list_(pa.int64())),
        "clicked_items_w": pa.array(weights, pa.list_(pa.float32())),
        "tags": pa.array(_lists(rng, n, VOCAB["tags"], 3), pa.list_(pa.int32())),
        "109_14": pa.array(_lists(rng, n, VOCAB["109_14"], 8), pa.list_(pa.int64())),
    })


def shop_folder(folder: Path, rows: dict[str, int] | None = None, *, schema: bool = True) -> Path:
    """train/val/test.parquet (default 600/200/200 rows) and, with `schema`, tests/data/shop/schema.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((rows or {"train": 600, "val": 200, "test": 200}).items()):
        pq.write_table(shop_table(n, k), folder / f"{split}.parquet", row_group_size=max(1, n // 3))
    if schema:
        shutil.copy(SHOP / "schema.json", folder / "schema.json")
    return folder


def inline_lists(folder: Path, split: str) -> list[dict[str, object]]:
    """The rows of `<split>.parquet`, each with its row of `<split>.lists.parquet` (Note [List tables])."""
    rows = pq.read_table(folder / f"{split}.parquet")
    lists = pq.read_table(folder / f"{split}.lists.parquet").take(rows.column("list_row"))
    return [{**r, **x} for r, x in zip(rows.to_pylist(), lists.to_pylist(), strict=True)]


def shop_spec(folder: Path, at: Path) -> Path:
    """tests/golden/shop_lists.mtl reading `folder`."""
    text = (SHOP.parent.parent / "golden" / "shop_lists.mtl").read_text()
    spec = at / "shop_lists.mtl"
    spec.write_text(text.replace('data "tests/data/shop"', f"data {json.dumps(str(folder))}"))
    return spec
