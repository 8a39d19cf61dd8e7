"""Run folders: names, and every file in them written atomically (tmp in the same folder, fsync, os.replace).

A run folder (`runs/<model>-<data>-<YYYYmmdd-HHMMSS>` or `--out DIR`) holds
`spec.mtl` (the spec text trained), `model.py` (the generated source used), `checkpoint.pt` (the best
epoch's full training state), `last.pt` (the latest state: end of an epoch or every N steps),
`metrics.json`, `history.csv` and `curve.png`. A reader never sees a half-written file: a crash leaves
either the previous version or the new one, plus at most a stray `.<name>.*.tmp` that readers ignore.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CHECKPOINT",
    "CURVE",
    "HISTORY",
    "LAST",
    "METRICS",
    "MODEL_SOURCE",
    "SPEC",
    "atomic_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "clean_stale_tmp",
    "data_label",
    "new_run_dir",
    "read_metrics",
    "write_curve",
    "write_history",
]

SPEC = "spec.mtl"
MODEL_SOURCE = "model.py"
CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
METRICS = "metrics.json"
HISTORY = "history.csv"
CURVE = "curve.png"
SCHEMA = "schema.json"  # the data's schema as the run read it, vocabulary sizes included (Note [The user's folder])

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def data_label(source: str) -> str:
    """A short, file-name-safe name for a dataset source: `synthetic`, `ali_ccp`, or a folder's name."""
    name = Path(source.rstrip("/\\")).name or source
    return _SAFE.sub("_", name).strip("_") or "data"


def new_run_dir(model: str, data: str, root: str | Path = "runs", *, now: float | None = None) -> Path:
    """Create and return `root/<model>-<data>-<YYYYmmdd-HHMMSS>` (with `-2`, `-3`… if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path(root) / f"{_SAFE.sub('_', model)}-{data_label(data)}-{stamp}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on success fsync it and os.replace it onto `path`.

    On an exception the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy the file `src` onto `dst` atomically (as atomic_write), without reading it into memory."""
    with open(src, "rb") as f, atomic_write(dst, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null: metrics.json stays strict JSON (a one-class split has no AUC)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / METRICS).read_text(encoding="utf-8"))


def clean_stale_tmp(run_dir: str | Path) -> None:
    """Remove temporary files a killed process left behind (they were never renamed into place)."""
    for p in Path(run_dir).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()


def write_history(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """history.csv: one row per epoch; the columns are the union of the rows' keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _cell(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_curve(path: str | Path, history: Sequence[Mapping[str, Any]], loss_keys: Sequence[str], monitor: str,
                *, best_epoch: int | None = None, log: Callable[[str], None] | None = None) -> bool:
    """curve.png: per-epoch train losses (left) and the validation monitor with the best epoch starred (right).

    False (and nothing written) when matplotlib is absent.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError:  # a declared dependency; a stripped install still trains
        if log:
            log("matplotlib is not installed: no curve.png")
        return False
    epochs = [int(r["epoch"]) for r in history]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    ax_loss, ax_val = fig.subplots(1, 2)
    for key in loss_keys:
        col = f"train_loss_{key}"
        ax_loss.plot(epochs, [_num(r.get(col)) for r in history], marker="o", label=key)
    ax_loss.set_title("train loss")
    ax_loss.set_xlabel("epoch")
    if loss_keys:
        ax_loss.legend(fontsize="small")
    val = [_num(r.get(f"val_{monitor}")) for r in history]
    ax_val.plot(epochs, val, marker="o", color="tab:green")
    if best_epoch in epochs:
        i = epochs.index(best_epoch)
        ax_val.plot([best_epoch], [val[i]], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"best (epoch {best_epoch})")
        ax_val.legend(fontsize="small")
    ax_val.set_title(f"val {monitor}")
    ax_val.set_xlabel("epoch")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        if epochs:
            ax.set_xticks(epochs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
