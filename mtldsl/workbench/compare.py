"""`mtldsl compare`: train every (spec or variant, seed) through the generic trainer, then compare them.

Takes spec paths, --set settings (variants.py) and training options; gives a Comparison: one run folder per
(entry, seed) under `out/runs/` (reused when finished, resumed when interrupted: Note [Resumable compare]),
the per-seed test metrics, paired differences against the baseline, DeLong's test per seed on the test rows
(delong.py) and a verdict (Note [Verdict]). report.py writes it out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..diagnostics import SpecError
from ..parser import parse_file
from ..pipeline import check_text
from ..lower import DEFAULT_DATA
from ..syntax import DataDecl, Spec
from ..vocab import Metric
from .delong import delong
from .variants import Setting, Variant, expand, safe_label

__all__ = ["CompareError", "Comparison", "Entry", "plan", "run_all", "summarise", "verdict"]

PREDICTIONS = "test_predictions.parquet"

# Note [Resumable compare]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# Run (entry e, seed k) lives in `out/runs/<e>/seed<k>/`. compare decides per folder: metrics.json present
# -> finished, reused as is (after checking it was trained with the settings asked for now: spec text,
# seed, data, rows, epochs); last.pt or checkpoint.pt present -> interrupted, continued with train(...,
# resume=True), which restarts exactly where it stopped (Note [Resume] in runtime/loop.py); otherwise a new
# run. The test predictions (`test_predictions.parquet`, for DeLong's test) are written once per finished
# run. So a killed compare, run again with the same arguments, redoes at most the steps after the last
# checkpoint of the one run that was training.

# Note [Verdict]
# ~~~~~~~~~~~~~~
# "ahead beyond the seed spread": every seed of the entry scores better than every seed of the baseline
# (the entry's worst seed beats the baseline's best; "better" is higher for AUC/gAUC, lower for logloss,
# MSE, MAE). "behind beyond the seed spread" is the mirror image; anything else is "within the seed spread".
# It asks the ranges over seeds not to overlap, a plain rule that needs no distributional assumption and
# that two or three seeds can already satisfy; with one seed there is no spread and no verdict. DeLong's
# p-values say whether one seed's AUC gap exceeds the test set's sampling noise; the verdict says whether
# the gap exceeds the training noise (initialisation, shuffling), which is usually the larger.


class CompareError(ValueError):
    """A comparison that cannot be made (datasets differ, baseline not compared, bad --set); one line."""


@dataclass(frozen=True)
class Entry:
    """One spec or variant to train over the seeds: its label, its text and where it came from."""

    label: str
    source: Path
    variant: Variant

    @property
    def folder(self) -> str:
        return safe_label(self.label)


def plan(specs: Sequence[Path], settings: Sequence[Setting], baseline: str | None,
         data: str | None = None, data_dir: str | None = None) -> tuple[list[Entry], Entry]:
    """The entries (each spec, expanded by the --set settings) and the baseline among them. Without `data`
    (--data) every spec must name the same dataset: runs on different data cannot be compared."""
    entries: list[Entry] = []
    sources: dict[str, list[str]] = {}
    for path in specs:
        if not path.is_file():
            raise CompareError(f"{path}: no such spec file")
        _, parsed = parse_file(path)
        if not isinstance(parsed, Spec):
            raise SpecError(parsed)
        decl = next((i for i in parsed.items if isinstance(i, DataDecl)), None)
        sources.setdefault(decl.source if decl else DEFAULT_DATA, []).append(str(path))
        for v in expand(parsed, path.stem, list(settings), str(path)):
            if settings:  # a variant must be a valid spec before anything trains
                checked = check_text(v.text, f"{safe_label(v.label)}.mtl", data_dir=data_dir)
                if not checked.ok:
                    raise SpecError(checked.errors)
            entries.append(Entry(v.label, path, v))
    if data is None and len(sources) > 1:
        shown = "; ".join(f"{k}: {', '.join(v)}" for k, v in sources.items())
        raise CompareError(f"runs of different datasets compared together ({shown}); pass --data to train all on one")
    folders = [e.folder for e in entries]
    clash = next((f for f in folders if folders.count(f) > 1), None)
    if clash is not None:
        raise CompareError(f"two entries would share the run folder '{clash}': give the specs different file names")
    if baseline is None:
        return entries, entries[0]
    matches = [e for e in entries if baseline in (e.label, e.folder, str(e.source), e.source.stem)
               or Path(baseline).resolve() == e.source.resolve()]
    if not matches:
        raise CompareError(f"baseline '{baseline}' is not among the specs compared ("
                           + ", ".join(e.label for e in entries) + ")")
    if len(matches) > 1:
        raise CompareError(f"baseline '{baseline}' names several entries (" + ", ".join(e.label for e in matches)
                           + "); give one of those labels")
    return entries, matches[0]


# --------------------------------------------------------------------------------------------
# Training (resumable)


def _check_reused(run_dir: Path, text: str, metrics: dict[str, Any], asked: dict[str, Any]) -> None:
    saved = (run_dir / "spec.mtl").read_text(encoding="utf-8") if (run_dir / "spec.mtl").is_file() else None
    if saved is not None and saved != text:
        raise CompareError(f"{run_dir} was trained from another spec text; use another --out")
    config = metrics.get("config", {})
    for key, value in asked.items():
        if value is not None and config.get(key) != value:
            raise CompareError(f"{run_dir} was trained with {key}={config.get(key)!r}, not {value!r}; "
                               "use another --out (or the same settings)")


def train_one(entry: Entry, seed: int, out: Path, options: dict[str, Any], progress: bool) -> Path:
    """Train (or reuse, or resume) the run of `entry` at `seed` (Note [Resumable compare]); its folder."""
    from ..runtime import runs
    from ..runtime.trainer import predict, train

    run_dir = out / "runs" / entry.folder / f"seed{seed}"
    spec_file = out / "specs" / f"{entry.folder}.mtl"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    if not spec_file.is_file() or spec_file.read_text(encoding="utf-8") != entry.variant.text:
        runs.atomic_write_text(spec_file, entry.variant.text)
    asked = {"seed": seed, **{k: options[k] for k in ("data", "rows", "epochs") if k in options}}
    if (run_dir / runs.METRICS).is_file():
        _check_reused(run_dir, entry.variant.text, runs.read_metrics(run_dir), asked)
    elif (run_dir / runs.LAST).is_file() or (run_dir / runs.CHECKPOINT).is_file():
        train(spec_file, out=run_dir, resume=True, progress=progress,
              **({"epochs": options["epochs"]} if options.get("epochs") else {}))
    else:
        train(spec_file, out=run_dir, seed=seed, progress=progress, **options)
    if not (run_dir / PREDICTIONS).is_file():
        predict(run_dir, run_dir / PREDICTIONS)
    return run_dir


def run_all(entries: Sequence[Entry], seeds: Sequence[int], out: Path, options: dict[str, Any], *,
            progress: bool = True, log: Callable[[str], None] | None = None) -> dict[tuple[str, int], Path]:
    """Every (entry, seed) run folder, trained or reused, in order; a progress bar over the runs."""
    import sys

    from tqdm.auto import tqdm

    todo = [(e, s) for e in entries for s in seeds]
    done: dict[tuple[str, int], Path] = {}
    bar = tqdm(total=len(todo), desc="compare", unit="run", file=sys.stderr, disable=not progress)
    try:
        for entry, seed in todo:
            bar.set_postfix_str(f"{entry.label} seed {seed}", refresh=True)
            if log is not None:
                log(f"{entry.label}, seed {seed}")
            done[(entry.label, seed)] = train_one(entry, seed, out, options, progress)
            bar.update(1)
    finally:
        bar.close()
    return done


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class Comparison:
    """Everything report.py writes: per entry the seeds' metrics, per pair with the baseline the differences."""

    baseline: str
    seeds: list[int]
    entries: list[dict[str, Any]] = field(default_factory=list)  # label, spec, params, samples_per_second, runs
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per (entry, output, metric)
    delong: list[dict[str, Any]] = field(default_factory=list)  # one row per (entry, output, seed)
    dataset: str = ""


def verdict(values: Sequence[float], base: Sequence[float], higher_is_better: bool) -> str:
    """Note [Verdict]."""
    vals = [v for v in values if not math.isnan(v)]
    refs = [v for v in base if not math.isnan(v)]
    if len(vals) < 2 or len(refs) < 2:
        return "n/a (one seed)" if vals and refs else "n/a"
    sign = 1.0 if higher_is_better else -1.0
    if min(sign * v for v in vals) > max(sign * v for v in refs):
        return "ahead beyond the seed spread"
    if max(sign * v for v in vals) < min(sign * v for v in refs):
        return "behind beyond the seed spread"
    return "within the seed spread"


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    return {"mean": statistics.fmean(finite) if finite else math.nan,
            "std": statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan),
            "min": min(finite) if finite else math.nan, "max": max(finite) if finite else math.nan,
            "spread": (max(finite) - min(finite)) if finite else math.nan}


def _dataset_key(metrics: dict[str, Any]) -> tuple[Any, ...]:
    cfg = metrics.get("config", {})
    return metrics.get("dataset"), cfg.get("data_dir"), cfg.get("rows"), cfg.get("data_seed")


def _labels_of(run_dir: Path) -> tuple[dict[str, tuple[str, str | None, tuple[str, ...], tuple[str, ...]]], Any]:
    """Per metric key: (output, kind, label columns, mask columns); and the run's test predictions."""
    import pandas as pd

    from ..pipeline import check_file
    from ..runtime.objective import Objective

    checked = check_file(run_dir / "spec.mtl")
    assert checked.model is not None
    objective = Objective(checked.model)
    terms = {m.key: (m.output, m.kind.value, objective.columns[m.label],
                     objective.columns[m.mask] if m.mask else ()) for m in objective.metrics}
    return terms, pd.read_parquet(run_dir / PREDICTIONS)


def _truth(frame: Any, columns: Sequence[str]) -> np.ndarray:
    y = np.ones(len(frame))
    for c in columns:
        y = y * frame[f"label_{c}"].to_numpy(dtype=np.float64)
    return y


def _delong_rows(entry: str, base: str, seeds: Sequence[int], runs: dict[tuple[str, int], Path]) -> list[dict]:
    rows = []
    for seed in seeds:
        terms, mine = _labels_of(runs[(entry, seed)])
        _, theirs = _labels_of(runs[(base, seed)])
        for key, (output, kind, label, mask) in terms.items():
            needed = [output, *(f"label_{c}" for c in (*label, *mask))]
            if kind != "binary" or any(c not in theirs.columns for c in needed):
                continue  # the baseline has no such output (or label): nothing to pair
            y = _truth(mine, label)
            if len(mine) != len(theirs) or not np.array_equal(y, _truth(theirs, label)):
                raise CompareError(f"{runs[(entry, seed)]} and {runs[(base, seed)]} were tested on different "
                                   "rows: DeLong's test needs the same test rows")
            keep = _truth(mine, mask) > 0.5 if mask else np.ones(len(mine), dtype=bool)
            res = delong(y[keep], mine[output].to_numpy()[keep], theirs[output].to_numpy()[keep])
            rows.append({"entry": entry, "output": key, "seed": seed,
                         **({"auc": res.auc_a, "baseline_auc": res.auc_b, "diff": res.diff, "se": res.se,
                             "z": res.z, "p": res.p} if res is not None else
                            {"auc": math.nan, "baseline_auc": math.nan, "diff": math.nan, "se": math.nan,
                             "z": math.nan, "p": math.nan})})
    return rows


def summarise(entries: Sequence[Entry], baseline: Entry, seeds: Sequence[int],
              runs: dict[tuple[str, int], Path]) -> Comparison:
    """Read every run's metrics.json: statistics over seeds, paired differences, DeLong, verdicts."""
    from ..runtime.runs import read_metrics

    metrics = {k: read_metrics(v) for k, v in runs.items()}
    keys = {_dataset_key(m) for m in metrics.values()}
    if len(keys) > 1:
        shown = "; ".join(f"{k[0]} (rows {k[2]})" for k in sorted(keys, key=str))
        raise CompareError(f"runs of different datasets compared together: {shown}")
    comp = Comparison(baseline.label, list(seeds), dataset=str(next(iter(keys))[0]))
    for e in entries:
        ms = [metrics[(e.label, s)] for s in seeds]
        comp.entries.append({
            "label": e.label, "spec": str(e.source), "settings": dict(e.variant.settings),
            "params": ms[0]["params"],
            "samples_per_second": statistics.fmean(_num(m["train"]["samples_per_second"]) for m in ms),
            "runs": {str(s): str(runs[(e.label, s)]) for s in seeds}})
        base_ms = [metrics[(baseline.label, s)] for s in seeds]
        for output, values in ms[0]["tasks"].items():
            for metric in values:
                if metric == "n" or metric not in Metric.__members__:
                    continue
                per_seed = [_num(m["tasks"].get(output, {}).get(metric)) for m in ms]
                base = [_num(m["tasks"].get(output, {}).get(metric)) for m in base_ms]
                diffs = [a - b for a, b in zip(per_seed, base)]
                row = {"entry": e.label, "output": output, "metric": metric, "seeds": per_seed,
                       **_stats(per_seed), "diff_mean": _stats(diffs)["mean"], "diff_std": _stats(diffs)["std"],
                       "verdict": "baseline" if e is baseline else verdict(
                           per_seed, base, Metric(metric).higher_is_better)}
                comp.metrics.append(row)
        if e is not baseline:
            comp.delong += _delong_rows(e.label, baseline.label, seeds, runs)
    return comp
