"""Ali-CCP at its real size: write raw files, prepare them, train one epoch; print the costs.

Writes raw Tianchi-format files (Note [Ali-CCP raw format] in mtldsl/runtime/prepare.py) of a given
size, then runs, each in a fresh process, `mtldsl data prepare ali_ccp` and one epoch of each model,
and prints prepare rows/s, train samples/s, peak RSS (the child's ru_maxrss) and the disk footprint
of the raw and the prepared files.

    python benchmarks/scale.py                          # the real size: 42.3M train, 43.0M test rows
    python benchmarks/scale.py --train-rows 1M --test-rows 1M --models esmm,mmoe
    python benchmarks/scale.py --stages generate --work /data/raw_ccp    # only write the raw files

The default sizes are the real Ali-CCP's: 42.3M train and 43.0M test skeleton lines, ~730k
common-feature lines per split, user behaviour lists (109_14, 110_14, 127_14, 150_14) of a few to
dozens of weighted entries. The ids are synthetic: each field draws from a Zipf-like law over a
vocabulary of the published size's order, the click and purchase rates are the real ones (3.9 %,
0.55 % of clicks), and labels depend only on a latent propensity per user, which one epoch at ~58 rows
per user does not learn (test AUCs stay near 0.5). It measures cost, not quality: the AUCs it prints
say only that training ran.

Generation runs in pyarrow's string kernels, one chunk of lines at a time, so it writes ~100 MB/s
in bounded memory. Run it alone: a second CPU-heavy job on 2 cores makes every figure meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]

REAL_TRAIN = 42_300_000
REAL_TEST = 43_000_000
REAL_USERS = 730_000  # common-feature lines per split

# Field -> distinct ids of the order seen in the real data (sizes of the prepared vocabularies).
USER_FIELDS = {"101": 240_000, "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3, "129": 5}
BEHAVIOUR_FIELDS = {"109_14": 6_000, "110_14": 200_000, "127_14": 100_000, "150_14": 80_000}
ITEM_FIELDS = {"205": 470_000, "206": 7_000, "207": 260_000, "210": 80_000, "216": 100_000}
CROSS_FIELDS = {"508": 9_000, "509": 50_000, "702": 30_000, "853": 40_000}  # present in ~70 % of lines
CONTEXT_FIELDS = {"301": 3}
CLICK_RATE = 0.039
PURCHASE_RATE = 0.0055  # of clicks
NOISE_RATE = 0.00002  # purchase without a click: prepare drops these
CHUNK = 500_000  # lines per generation chunk


def _count(text: str) -> int:
    """`42.3M`, `730k`, `1000` -> an int."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _zipf_ids(rng: np.random.Generator, n: int, vocab: int, offset: int) -> np.ndarray:
    """n raw ids over `vocab` values with a Zipf-like (rank^-1.1) law, shifted by `offset` to stay distinct per field."""
    u = rng.random(n)
    rank = np.floor(vocab ** u).astype(np.int64)  # log-uniform rank: P(rank=r) ~ 1/r
    return offset + np.minimum(rank, vocab - 1)


def _features(field: str, ids: np.ndarray, values: np.ndarray | None = None) -> pa.Array:
    """A pyarrow string array of `field\\x02id\\x03value` entries, one per id."""
    vals = pa.array(np.char.mod("%.3f", values)) if values is not None else pa.scalar("1.0")
    return pc.binary_join_element_wise(pa.scalar(field + "\x02"), pa.array(ids).cast(pa.string()),
                                       pa.scalar("\x03"), vals, "")


def _join(parts: list[pa.Array], sep: str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, pa.scalar(sep), null_handling="skip")


def _write_lines(f: BinaryIO, lines: pa.Array) -> int:
    """Append a string array as newline-ended lines; returns bytes written."""
    text = pc.binary_join_element_wise(lines, pa.scalar("\n"), "")
    buf = text.buffers()  # validity, int32 offsets, characters
    offsets = np.frombuffer(buf[1], dtype=np.int32, count=len(text) + 1, offset=text.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    f.write(memoryview(buf[2])[start:end])
    return end - start


def _behaviour(rng: np.random.Generator, n_users: int, field: str, vocab: int, offset: int) -> pa.Array:
    """One behaviour list per user: 1 to ~60 weighted entries (geometric, mean ~12), as one string per user."""
    lengths = np.minimum(1 + rng.geometric(1 / 12, n_users), 60)
    ids = _zipf_ids(rng, int(lengths.sum()), vocab, offset)
    weights = np.round(np.log1p(rng.geometric(0.3, len(ids))), 3)
    entries = _features(field, ids, weights)
    if isinstance(entries, pa.ChunkedArray):  # a kernel's output over a large input may come in chunks
        entries = entries.combine_chunks()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), entries)
    return pc.binary_join(lists, "\x01")


def _offsets() -> dict[str, int]:
    """Raw ids of each field start at their own offset, as in the real files (ids are global)."""
    out, start = {}, 1_000
    for table in (USER_FIELDS, BEHAVIOUR_FIELDS, ITEM_FIELDS, CROSS_FIELDS, CONTEXT_FIELDS):
        for f, v in table.items():
            out[f] = start
            start += v + 1_000
    return out


def generate(folder: Path, train_rows: int, test_rows: int, users: int, seed: int = 0) -> dict[str, int]:
    """Write sample_skeleton_{train,test}.csv and common_features_{train,test}.csv; returns bytes per file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    offset = _offsets()
    sizes: dict[str, int] = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        # Common features: one line per user.
        path = folder / f"common_features_{split}.csv"
        taste = rng.normal(size=users)  # a latent user propensity that drives clicks
        written = 0
        with open(path, "wb") as f:
            for lo in range(0, users, CHUNK):
                n = min(CHUNK, users - lo)
                user_id = offset["101"] + np.arange(lo, lo + n) % USER_FIELDS["101"]  # one person per line
                parts = [_features("101", user_id)]
                parts += [_features(fld, _zipf_ids(rng, n, v, offset[fld])) for fld, v in USER_FIELDS.items()
                          if fld != "101"]
                parts += [_behaviour(rng, n, fld, v, offset[fld]) for fld, v in BEHAVIOUR_FIELDS.items()]
                feats = _join(parts, "\x01")
                idx = pa.array(np.char.mod(f"{split[:2]}%08x", np.arange(lo, lo + n)))
                count = pa.array(np.full(n, len(parts)).astype(str))  # the count column is not read
                written += _write_lines(f, _join([idx, count, feats], ","))
        sizes[path.name] = written
        # Skeleton: one line per sample.
        path = folder / f"sample_skeleton_{split}.csv"
        written = 0
        with open(path, "wb") as f:
            for lo in range(0, rows, CHUNK):
                n = min(CHUNK, rows - lo)
                user = rng.integers(0, users, n)
                logit = np.log(CLICK_RATE / (1 - CLICK_RATE)) + 0.5 * taste[user] - 0.125
                click = rng.random(n) < 1 / (1 + np.exp(-logit))
                purchase = click & (rng.random(n) < PURCHASE_RATE * np.exp(0.5 * taste[user] - 0.125))
                purchase |= ~click & (rng.random(n) < NOISE_RATE)
                parts = [_features(fld, _zipf_ids(rng, n, v, offset[fld])) for fld, v in ITEM_FIELDS.items()]
                for fld, v in CROSS_FIELDS.items():
                    present = rng.random(n) < 0.7
                    entry = _features(fld, _zipf_ids(rng, n, v, offset[fld]), np.round(rng.random(n) * 2, 3))
                    parts.append(pc.if_else(pa.array(present), entry, pa.nulls(n, pa.string())))
                parts += [_features(fld, _zipf_ids(rng, n, v, offset[fld])) for fld, v in CONTEXT_FIELDS.items()]
                feats = _join(parts, "\x01")
                cols = [pa.array(np.char.mod(f"{split}%09d", np.arange(lo, lo + n))),
                        pa.array(click.astype(np.int8).astype(str)), pa.array(purchase.astype(np.int8).astype(str)),
                        pa.array(np.char.mod(f"{split[:2]}%08x", user)), pa.array(np.full(n, "14")), feats]
                written += _write_lines(f, _join(cols, ","))
        sizes[path.name] = written
    return sizes


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes
    returncode: int
    stderr: str


def run(cmd: list[str]) -> Measured:
    """Run a command in a fresh process: wall time and the child's own peak RSS (os.wait4; ru_maxrss is KiB)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return Measured(seconds, usage.ru_maxrss * 1024, proc.returncode, err.read())


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-rows", default=str(REAL_TRAIN), help="skeleton lines of the train file (42.3M)")
    ap.add_argument("--test-rows", default=str(REAL_TEST), help="skeleton lines of the test file (43.0M)")
    ap.add_argument("--users", default=None,
                    help="common-feature lines per split (default: 730k scaled by --train-rows / 42.3M, as in the real data)")
    ap.add_argument("--models", default="esmm,mmoe", help="specs/<name>.mtl to train one epoch each")
    ap.add_argument("--stages", default="generate,prepare,train", help="any of generate, prepare, train")
    ap.add_argument("--work", type=Path, default=None, help="folder for raw/, prepared/ and runs/ (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    train_rows, test_rows = _count(args.train_rows), _count(args.test_rows)
    users = _count(args.users) if args.users else max(1, round(REAL_USERS * train_rows / REAL_TRAIN))
    work = args.work or Path(tempfile.mkdtemp(prefix="mtldsl-scale-"))
    raw, prepared, runs = work / "raw", work / "prepared", work / "runs"
    stages = set(args.stages.split(","))
    mtldsl = [sys.executable, "-m", "mtldsl"]
    report: dict[str, object] = {"train_rows": train_rows, "test_rows": test_rows, "users": users}
    try:
        if "generate" in stages:
            start = time.perf_counter()
            sizes = generate(raw, train_rows, test_rows, users, args.seed)
            secs = time.perf_counter() - start
            report["raw_bytes"] = sum(sizes.values())
            print(f"generate: {train_rows + test_rows:,} skeleton lines, {gib(sum(sizes.values()))} in {secs:.0f}s")
        if "prepare" in stages:
            m = run([*mtldsl, "data", "prepare", "ali_ccp", "--raw", str(raw), "--out", str(prepared), "--no-progress"])
            if m.returncode:
                sys.exit(f"prepare failed:\n{m.stderr}")
            rate = (train_rows + test_rows) / m.seconds
            report.update(prepare_seconds=round(m.seconds, 1), prepare_rows_per_s=round(rate),
                          prepare_peak_rss=m.peak_rss, prepared_bytes=du(prepared))
            print(f"prepare: {m.seconds:.0f}s, {rate:,.0f} rows/s, peak RSS {gib(m.peak_rss)}, "
                  f"on disk {gib(du(prepared))} (raw {gib(du(raw))})")
        if "train" in stages:
            for name in args.models.split(","):
                out = runs / name
                shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, not a resume
                m = run([*mtldsl, "train", str(ROOT / "specs" / f"{name}.mtl"), "--data", str(prepared),
                         "--epochs", "1", "--no-progress", "--out", str(out)])
                if m.returncode:
                    sys.exit(f"train {name} failed:\n{m.stderr}")
                metrics = json.loads((out / "metrics.json").read_text())
                sps = metrics["train"]["samples_per_second"]
                report[f"{name}_samples_per_s"] = sps
                report[f"{name}_peak_rss"] = m.peak_rss
                print(f"train {name}: {m.seconds:.0f}s, {sps:,.0f} samples/s, peak RSS {gib(m.peak_rss)}")
        print(json.dumps(report))
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
