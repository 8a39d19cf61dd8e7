"""The built-in synthetic dataset: a row count and a seed -> columns with planted structure, and their truth.

Takes (rows, seed); gives `generate` (numpy columns named like Ali-CCP's fields and labels, plus the
planted truth of every row: Note [Synthetic data]), `synthetic_truth`, `split_sizes` (80/10/10), and
`stored` (more than MEMORY_ROWS rows, generated chunk by chunk into a column store). data.py turns the
columns into splits. numpy only.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mtldsl.catalog import KNOWN_DATASETS, SYNTHETIC_VOCAB

from .store import FORMAT, Role, Stored, narrow_id_dtype, npy_writer, open_columns, publish, user_cache

__all__ = ["MEMORY_ROWS", "SYNTHETIC_ROWS", "generate", "split_sizes", "stored", "synthetic_truth"]

SYNTHETIC_ROWS = 100_000  # default total rows of the synthetic dataset (80/10/10 train/val/test)

# Note [Synthetic data]
# The default dataset has Ali-CCP's fields and labels but planted, learnable structure:
# - 500 users (field 101) and 250 items (205) with lognormal popularity, so 100k rows give ~200 rows
#   per user and ~400 per item. Every user/item has a rank-4 latent vector: mostly its cluster's vector
#   (one of 8 user segments / 20 item categories: 0.95) plus a small individual part (0.31).
# - click logit = b_click + 1.1 aff(u, i) + user activity + item bias + position (field 301) + city,
#   aff = <p_u, q_i> scaled to unit variance over impressions. A purchase happens only after a click:
#   P(purchase | click) = sigmoid(b_buy + 1.2 aff'(u, i) + item quality), with p'_u = 0.9 p_u + noise for
#   most users but p'_u = -0.9 p_u + noise for the ~35% *conflicting* users (what they click is what
#   they would not buy: STEM's task conflict). Field 128 shows the conflict flag for 85% of users.
# - b_click and b_buy are solved per seed so that P(click) = 6% and P(purchase | click) = 15% (purchase 0.9%).
# - profile fields (121..129, 109_14..150_14) are functions of the user, item fields (206..216) of the
#   item, so they carry the cluster signal; 508/509/853 are user x item crosses, 702 is noise, and the
#   dense D* columns are noisy summaries in [0, 1].
# Bayes AUCs (AUC of the true probabilities), seeds 0-7: click 0.80-0.82, purchase 0.88-0.93,
# purchase given click 0.80-0.87.

_RANK = 4
_SEGMENTS = 8
_CLUSTER = 0.95  # weight of the segment/category vector in a user/item latent vector
_OWN = 0.31  # weight of the individual part (0.95**2 + 0.31**2 ~ 1)
_CONFLICT_SHARE = 0.35
_CLICK_RATE = 0.06
_BUY_GIVEN_CLICK = 0.15
_CLICK_SCALE = 1.1
_BUY_SCALE = 1.2
_POSITION_EFFECT = np.array([0.3, 0.0, -0.3])
_CITY_EFFECT = np.array([0.15, 0.05, -0.05, -0.15])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _standardise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x scaled to unit w-weighted standard deviation (so the Bayes AUC hardly varies with the seed)."""
    mean = float((w * x).sum() / w.sum())
    std = math.sqrt(float((w * (x - mean) ** 2).sum() / w.sum()))
    return x / std


def _solve_bias(logits: np.ndarray, weights: np.ndarray, target: float, scale: np.ndarray | None = None) -> float:
    """b with sum(w * scale * sigmoid(logits + b)) = target * sum(w * scale), by Newton's method."""
    w = weights if scale is None else weights * scale
    w = w / w.sum()
    b = math.log(target / (1 - target))
    for _ in range(50):
        s = _sigmoid(logits + b)
        f = float((w * s).sum()) - target
        step = f / max(float((w * s * (1 - s)).sum()), 1e-12)
        b -= step
        if abs(step) < 1e-10:
            break
    return b


def _world(rng: np.random.Generator) -> dict[str, Any]:
    """The users, items and biases every row is drawn from (the first draws of the seed's generator)."""
    v = SYNTHETIC_VOCAB
    n_users, n_items, n_cats = v["101"], v["205"], v["206"]
    # world: users and items
    seg_f = rng.normal(size=(_SEGMENTS, _RANK))
    cat_f = rng.normal(size=(n_cats, _RANK))
    seg = rng.integers(0, _SEGMENTS, n_users)
    cat = rng.integers(0, n_cats, n_items)
    p = _CLUSTER * seg_f[seg] + _OWN * rng.normal(size=(n_users, _RANK))
    q = _CLUSTER * cat_f[cat] + _OWN * rng.normal(size=(n_items, _RANK))
    conflict = rng.random(n_users) < _CONFLICT_SHARE
    sign = np.where(conflict, -1.0, 1.0)
    p_buy = 0.9 * sign[:, None] * p + 0.45 * rng.normal(size=(n_users, _RANK))
    q_buy = 0.9 * q + 0.45 * rng.normal(size=(n_items, _RANK))
    activity = rng.normal(0.0, 0.4, n_users)
    item_bias = rng.normal(0.0, 0.4, n_items)
    shop = rng.integers(0, v["207"], n_items)
    quality = rng.normal(0.0, 0.25, v["207"])[shop] + rng.normal(0.0, 0.2, n_items)
    user_w = rng.lognormal(0.0, 0.5, n_users)
    item_w = rng.lognormal(0.0, 0.7, n_items)
    user_w /= user_w.sum()
    item_w /= item_w.sum()
    city = rng.integers(0, v["129"], n_users)

    # biases for the target rates, exact over the user x item x position grid
    grid_w = user_w[:, None] * item_w[None, :]
    aff = _standardise(p @ q.T, grid_w)  # (U, I) user-item click preference, unit variance over impressions
    aff_buy = _standardise(p_buy @ q_buy.T, grid_w)
    base = _CLICK_SCALE * aff + activity[:, None] + item_bias[None, :] + _CITY_EFFECT[city][:, None]
    pos = _POSITION_EFFECT[None, None, :]
    b_click = _solve_bias((base[..., None] + pos).ravel(), np.repeat(grid_w.ravel(), 3), _CLICK_RATE)
    p_click_grid = _sigmoid(base[..., None] + pos + b_click).mean(axis=2)  # positions are uniform
    buy_logit = _BUY_SCALE * aff_buy + quality[None, :]
    b_buy = _solve_bias(buy_logit.ravel(), grid_w.ravel(), _BUY_GIVEN_CLICK, scale=p_click_grid.ravel())

    # user profile and behaviour fields: functions of the user
    seg_obs = np.where(rng.random(n_users) < 0.9, seg, rng.integers(0, _SEGMENTS, n_users))
    gender = np.where(rng.random(n_users) < 0.9, seg % 2, 1 - seg % 2)
    age = (seg // 2 + rng.integers(0, 4, n_users)) % v["125"]
    level = np.digitize(activity, np.quantile(activity, [1 / 3, 2 / 3]))
    depth = rng.integers(0, v["127"], n_users)
    occupation = np.where(rng.random(n_users) < 0.85, conflict.astype(np.int64), 1 - conflict.astype(np.int64))
    fav_click = np.argmax(p @ cat_f.T, axis=1)
    fav_buy = np.argmax(p_buy @ cat_f.T, axis=1)
    user_cols = {
        "121": seg_obs,
        "122": gender * v["125"] + age,
        "124": gender,
        "125": age,
        "126": level,
        "127": depth,
        "128": occupation,
        "129": city,
        "109_14": fav_click,
        "110_14": fav_buy,
        "127_14": fav_click * 4 + rng.integers(0, 4, n_users),
        "150_14": fav_buy * 2 + rng.integers(0, 2, n_users),
    }
    user_dense = {
        "D109_14": np.clip(_sigmoid(0.5 * (p * cat_f[fav_click]).sum(1)) + rng.normal(0, 0.1, n_users), 0, 1),
        "D110_14": _sigmoid(2.0 * activity + rng.normal(0.0, 0.5, n_users)),
        "D127_14": 0.3 * rng.random(n_users),
        "D150_14": _sigmoid(sign + rng.normal(0.0, 1.0, n_users)),
    }
    # item fields: functions of the item
    brand = cat * 4 + rng.integers(0, 4, n_items)
    item_cols = {
        "206": cat,
        "207": shop,
        "210": cat * 2 + rng.integers(0, 2, n_items),
        "216": brand,
    }
    popularity = np.argsort(np.argsort(item_w)) / (n_items - 1)
    found = locals()
    return {k: found[k] for k in _WORLD}


def _rows(w: dict[str, Any], rng: np.random.Generator,
          rows: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`rows` rows of the world `w`, drawn from `rng`: columns (schema order, plus labels) and their truth."""
    v = SYNTHETIC_VOCAB
    (n_users, user_w, n_items, item_w, b_click, base, b_buy, buy_logit, user_cols, item_cols, seg_obs, n_cats,
     cat, age, brand, city, user_dense, seg_f, seg, cat_f, popularity, quality, aff, aff_buy,
     conflict) = (w[k] for k in _WORLD)
    u = rng.choice(n_users, size=rows, p=user_w)
    i = rng.choice(n_items, size=rows, p=item_w)
    position = rng.integers(0, 3, rows)
    click_logit = b_click + base[u, i] + _POSITION_EFFECT[position]
    buy_logit_rows = b_buy + buy_logit[u, i]
    p_click = _sigmoid(click_logit)
    p_buy_click = _sigmoid(buy_logit_rows)
    click = rng.random(rows) < p_click
    purchase = click & (rng.random(rows) < p_buy_click)

    cols: dict[str, np.ndarray] = {"click": click.astype(np.float32), "purchase": purchase.astype(np.float32)}
    cols["101"] = u
    for name in ("121", "122", "124", "125", "126", "127", "128", "129"):
        cols[name] = user_cols[name][u]
    cols["205"] = i
    for name in ("206", "207", "210", "216"):
        cols[name] = item_cols[name][i]
    cols["508"] = seg_obs[u] * n_cats + cat[i]
    cols["509"] = age[u] * 10 + brand[i] % 10
    cols["702"] = (u * 31 + i * 17) % v["702"]
    cols["853"] = city[u] * n_cats + cat[i]
    cols["301"] = position
    for name in ("109_14", "110_14", "127_14", "150_14"):
        cols[name] = user_cols[name][u]
    for name, values in user_dense.items():
        cols[name] = values[u]
    cross = np.einsum("rk,rk->r", seg_f[seg[u]], cat_f[cat[i]]) / math.sqrt(_RANK)
    cols["D508"] = _sigmoid(0.5 * cross + rng.normal(0.0, 1.0, rows))  # noisy segment x category affinity
    cols["D509"] = popularity[i]
    cols["D702"] = rng.random(rows)
    cols["D853"] = np.where(rng.random(rows) < 0.6, 0.0, _sigmoid(3.0 * quality[i] + rng.normal(0.0, 0.5, rows)))
    truth = {
        "p_click": p_click,
        "p_purchase_given_click": p_buy_click,
        "p_purchase": p_click * p_buy_click,
        "click_affinity": aff[u, i],
        "purchase_affinity": aff_buy[u, i],
        "conflict": conflict[u].astype(np.float32),
    }
    return cols, truth


_WORLD = (  # what _rows reads of the world
    "n_users", "user_w", "n_items", "item_w", "b_click", "base", "b_buy", "buy_logit", "user_cols", "item_cols",
    "seg_obs", "n_cats", "cat", "age", "brand", "city", "user_dense", "seg_f", "seg", "cat_f", "popularity",
    "quality", "aff", "aff_buy", "conflict"
)


def generate(rows: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Columns (schema order, plus labels) and the truth of `rows` synthetic rows; see Note [Synthetic data]."""
    rng = np.random.default_rng(seed)
    return _rows(_world(rng), rng, rows)


def synthetic_truth(rows: int = SYNTHETIC_ROWS, seed: int = 0) -> dict[str, np.ndarray]:
    """The planted truth of each synthetic row, in generation order (train, then val, then test rows).

    p_click, p_purchase_given_click, p_purchase = p_click * p_purchase_given_click: the true probabilities
    (their AUC is the Bayes AUC); click_affinity / purchase_affinity: the user-item preference terms;
    conflict: 1 where the row's user has conflicting click and purchase preferences.
    """
    return generate(rows, seed)[1]


def split_sizes(rows: int) -> tuple[int, int, int]:
    n_train = int(rows * 0.8)
    n_val = int(rows * 0.1)
    return n_train, n_val, rows - n_train - n_val




# --- large synthetic data, generated in chunks into a column store ---------------------------------

MEMORY_ROWS = 2_000_000  # up to this many rows: generated in memory in one draw (the data every test sees)
GENERATE_ROWS = 1 << 18  # rows per generated chunk above it
GENERATOR = 1  # version of the chunked generator: another number rebuilds the stored data


def stored(rows: int, seed: int) -> dict[str, Stored]:
    """`rows` synthetic rows in a column store (Note [Column store]) under the user cache, split 80/10/10.

    The world (users, items, biases) comes from the seed's generator as in `generate`; chunk k of
    GENERATE_ROWS rows from the generator seeded [seed, k], so the rows differ from `generate`'s (but
    have the same distribution) and memory is bounded by the chunk. No truth is kept.
    """
    schema = KNOWN_DATASETS["synthetic"].schema
    final = user_cache() / "synthetic" / f"rows{rows}-seed{seed}"
    key: dict[str, object] = {"format": FORMAT, "generator": GENERATOR, "rows": rows, "seed": seed}
    n_train, n_val, n_test = split_sizes(rows)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, rows)}
    dtypes = {(Role.label, c): np.dtype(np.uint8) for c in schema.labels}
    dtypes.update({(Role.sparse, c): narrow_id_dtype(0, SYNTHETIC_VOCAB[c] - 1) for c in schema.sparse})
    dtypes.update({(Role.dense, c): np.dtype(np.float32) for c in schema.dense})
    names = {k: f"{k[0].value}{j:03d}.npy" for j, k in enumerate(dtypes)}

    def build(work: Path) -> None:
        rng = np.random.default_rng(seed)
        world = _world(rng)
        with contextlib.ExitStack() as stack:
            files = {}
            for split, (a, b) in bounds.items():
                (work / split).mkdir()
                files[split] = {k: npy_writer(stack, work / split / names[k], t, b - a) for k, t in dtypes.items()}
            for k, start in enumerate(range(0, rows, GENERATE_ROWS)):
                m = min(GENERATE_ROWS, rows - start)
                cols, _ = _rows(world, np.random.default_rng([seed, k]), m)
                for split, (a, b) in bounds.items():
                    lo, hi = max(a, start), min(b, start + m)
                    for (role, c), t in dtypes.items() if lo < hi else ():
                        part = np.ascontiguousarray(cols[c][lo - start:hi - start], dtype=t)
                        files[split][role, c].write(part.tobytes())
        files_list = [[r.value, c, names[r, c]] for r, c in dtypes]
        (work / "manifest.json").write_text(json.dumps({**key, "files": files_list}), encoding="utf-8")

    manifest = publish(final, key, build)
    out = {}
    for split, (a, b) in bounds.items():
        cols = open_columns(final / split, manifest["files"])  # type: ignore[arg-type]
        out[split] = Stored(source=final / split, n=b - a, labels=cols[Role.label], sparse=cols[Role.sparse],
                            dense=cols[Role.dense], groups=cols[Role.sparse]["101"], max_ids={})
    return out
