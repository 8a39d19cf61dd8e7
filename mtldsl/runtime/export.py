"""A trained run folder (or any generated model) -> ONNX or TorchScript file, checked against PyTorch.

The generated module reads a dict and returns a dict; an exported graph takes positional tensors, so
`FlatModel` wraps it: inputs `sparse` (int64, (batch, len(SPARSE_FIELDS))), when the model reads
dense fields `dense` (float32, (batch, len(DENSE_FIELDS))), then for each of its LIST_FIELDS the batch
tensors of Note [List fields] (runtime/layers.py), named after their batch keys: `<f>.ids` (int64, (n_f,)),
`<f>.offsets` (int64, (batch,)) and, for WEIGHTED_FIELDS, `<f>.weights` (float32, (n_f,)); outputs a tuple in
OUTPUTS order (the ONNX outputs are named after them). The batch axis and each list's id count are dynamic.
Pooled lists export as they run: embedding_bag (ONNX: a Loop over bags) in every mode; the empty-bag
masking of max and the weight sums of a weighted mean are ordinary ops of the layer, so the exported
graph computes exactly what PyTorch does and the check below covers them. The ONNX exporter leaves out an
input the graph does not use: the weights of a field that is only max-pooled.

- TorchScript: `torch.jit.trace` (forward branches only on attributes fixed at construction, so one
  trace is the whole model; `torch.jit.script` cannot compile BatchedExperts' indexed ParameterLists).
- ONNX: the TorchScript-based `torch.onnx.export(dynamo=False)` first: it needs no extra package and
  exports a model in well under a second; the torch.export-based exporter (needs `onnxscript`, ~10 s
  per model) is the fallback, or the choice with exporter="dynamo". The `onnx` package is required
  (the file gets metadata), `onnxruntime` runs the check.

Every export is verified before it is moved into place: the exported file is loaded back
(torch.jit.load / an onnxruntime session) and run on random batches of several sizes (one different
from the traced size, and 1), and every output must match the eval-mode PyTorch module within
`tolerance` (default 1e-5); otherwise ExportError names the output and the difference and nothing is
written. Field names, output names and the mtldsl version travel with the file (ONNX metadata_props,
TorchScript extra file `mtldsl.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from .binding import list_fields, weighted_fields

__all__ = [
    "DEFAULT_FILES",
    "FORMATS",
    "ExportError",
    "ExportResult",
    "FlatModel",
    "export_model",
    "export_run",
    "list_keys",
    "load_trained",
    "sample_inputs",
]

FORMATS = ("onnx", "torchscript")
DEFAULT_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
EXPORTERS = ("auto", "torchscript", "dynamo")  # ONNX exporter paths
TOLERANCE = 1e-5
BATCH_SIZES = (64, 7, 1)  # the first is the traced/example size; the others prove the dynamic batch axis
OPSET = 17


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported file does not reproduce PyTorch's outputs."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str  # "onnx" | "torchscript"
    exporter: str  # how the file was made, e.g. "torch.onnx (TorchScript-based)"
    outputs: tuple[str, ...]
    max_abs_diff: float  # over every output and every checked batch
    per_output: dict[str, float]
    batch_sizes: tuple[int, ...]
    tolerance: float


def list_keys(model: nn.Module) -> list[str]:
    """The batch keys of a model's list fields, in input order (Note [List fields]); [] without lists."""
    weighted = set(weighted_fields(model))
    return [f"{f}.{part}" for f in list_fields(model)
            for part in ("ids", "offsets", *(("weights",) if f in weighted else ()))]


class FlatModel(nn.Module):
    """(sparse[, dense][, list tensors]) -> tuple of outputs in OUTPUTS order, around a generated dict-in/dict-out module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(model.OUTPUTS)
        self.uses_dense = bool(model.DENSE_FIELDS)
        self.list_keys = tuple(list_keys(model))

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The tensors named by input_names, in that order."""
        out = self.model(dict(zip(self.input_names, inputs)))
        return tuple(out[name] for name in self.outputs)

    @property
    def input_names(self) -> list[str]:
        return ["sparse", *(["dense"] if self.uses_dense else []), *self.list_keys]

    def dynamic_axes(self) -> dict[str, str]:
        """Each input's dynamic first axis: the batch, or a list field's id count (`n_<i>`, one per field)."""
        fields = list(dict.fromkeys(k.rpartition(".")[0] for k in self.list_keys))
        return {n: "batch" if not n.endswith((".ids", ".weights")) else f"n_{fields.index(n.rpartition('.')[0])}"
                for n in self.input_names}


def _check_generated(model: nn.Module) -> None:
    for attr in ("SPARSE_FIELDS", "DENSE_FIELDS", "OUTPUTS"):
        if not hasattr(model, attr):
            raise ExportError(f"{type(model).__name__} is not an mtldsl-generated model (no {attr})")


def sample_inputs(model: nn.Module, vocab_sizes: Mapping[str, int], batch: int, seed: int = 0) -> tuple[Tensor, ...]:
    """A random batch for `model`, as FlatModel's inputs: ids in [0, vocab) per sparse field, dense values in
    [0, 1), and per list field random bags of 0-4 ids (sample 1 has an empty list) with weights in [0.5, 1.5)."""
    _check_generated(model)
    g = torch.Generator().manual_seed(seed)
    lists = list_fields(model)
    missing = [f for f in (*model.SPARSE_FIELDS, *lists) if f not in vocab_sizes]
    if missing:
        raise ExportError(f"no vocabulary size for field(s) {', '.join(map(repr, missing))}")
    cols = [torch.randint(0, int(vocab_sizes[f]), (batch,), generator=g) for f in model.SPARSE_FIELDS]
    sparse = torch.stack(cols, dim=1) if cols else torch.zeros(batch, 0, dtype=torch.long)
    inputs = [sparse] + ([torch.rand(batch, len(model.DENSE_FIELDS), generator=g)] if model.DENSE_FIELDS else [])
    weighted = set(weighted_fields(model))
    for f in lists:
        lengths = torch.randint(0, 5, (batch,), generator=g)
        lengths[0] = lengths[0].clamp(min=1)
        if batch > 1:
            lengths[1] = 0
        n = int(lengths.sum())
        inputs += [torch.randint(0, int(vocab_sizes[f]), (n,), generator=g),
                   torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])]
        if f in weighted:
            inputs.append(torch.rand(n, generator=g) + 0.5)
    return tuple(inputs)


def _metadata(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    return {
        "mtldsl_version": __version__,
        "model": type(model).__name__,
        "inputs": json.dumps(list(names)),
        "sparse_fields": json.dumps(list(model.SPARSE_FIELDS)),
        "dense_fields": json.dumps(list(model.DENSE_FIELDS)),
        "list_fields": json.dumps(list(list_fields(model))),
        "weighted_fields": json.dumps(list(weighted_fields(model))),
        "outputs": json.dumps(list(model.OUTPUTS)),
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch 2.13 marks torch.jit.trace and the TorchScript-based ONNX exporter deprecated; both still work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


@contextlib.contextmanager
def _quiet_logs(name: str) -> Iterator[None]:
    """Silence a library's logger (the torch.export-based exporter logs optional-dependency notes)."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _temporary(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`; removed unless the caller moved it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _compare(reference: Sequence[Tensor], got: Sequence[Any], outputs: Sequence[str], batch: int,
             worst: dict[str, float]) -> None:
    if len(got) != len(reference):
        raise ExportError(f"the exported model returns {len(got)} outputs, PyTorch {len(reference)}")
    for name, ref, value in zip(outputs, reference, got):
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(ref.shape):
            raise ExportError(f"output '{name}' at batch {batch}: shape {tuple(value.shape)}, PyTorch {tuple(ref.shape)}")
        diff = (value.to(torch.float64) - ref.to(torch.float64)).abs()
        d = float(diff.max()) if diff.numel() else 0.0
        if d != d:  # NaN somewhere: only acceptable where PyTorch has the same NaN
            same_nan = torch.isnan(value) == torch.isnan(ref)
            d = float(diff.nan_to_num(0.0).max()) if bool(same_nan.all()) else float("inf")
        worst[name] = max(worst.get(name, 0.0), d)


def _verify(run: Any, flat: FlatModel, vocab_sizes: Mapping[str, int], batch_sizes: Sequence[int],
            tolerance: float) -> dict[str, float]:
    """Run `run(*inputs)` and the PyTorch module on random batches; the worst |diff| per output."""
    worst: dict[str, float] = {}
    for i, b in enumerate(batch_sizes):
        inputs = sample_inputs(flat.model, vocab_sizes, b, seed=1000 + i)
        with torch.no_grad():
            reference = flat(*inputs)
        _compare(reference, run(inputs), flat.outputs, b, worst)
    bad = {k: v for k, v in worst.items() if not v <= tolerance}
    if bad:
        detail = ", ".join(f"'{k}' max |diff| {v:.3g}" for k, v in bad.items())
        raise ExportError(f"exported outputs differ from PyTorch beyond {tolerance:g}: {detail}")
    return worst


def _export_torchscript(flat: FlatModel, example: tuple[Tensor, ...], path: Path, meta: Mapping[str, str]) -> str:
    with _quiet(), torch.no_grad():
        try:
            traced = torch.jit.trace(flat, example, check_trace=False)
        except Exception as e:  # tracing errors come in many types
            raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {e}") from e
        torch.jit.save(traced, str(path), _extra_files={"mtldsl.json": json.dumps(dict(meta), indent=2)})
    return "torch.jit.trace"


def _run_torchscript(path: Path) -> Any:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(inputs: tuple[Tensor, ...]) -> list[Tensor]:
        with torch.no_grad():
            return list(loaded(*inputs))

    return run


def _require(module: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"ONNX export needs the '{module}' package ({why}): pip install onnx onnxruntime"
            + (" onnxscript" if module == "onnxscript" else "")
        ) from None


def _export_onnx(flat: FlatModel, example: tuple[Tensor, ...], path: Path, meta: Mapping[str, str],
                 exporter: str) -> str:
    onnx = _require("onnx", "to write the model file")
    names = flat.input_names
    outputs = list(flat.outputs)
    errors: list[str] = []
    used = ""
    if exporter in ("auto", "torchscript"):
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(flat, example, str(path), dynamo=False, input_names=names, output_names=outputs,
                                  dynamic_axes={**{n: {0: axis} for n, axis in flat.dynamic_axes().items()},
                                                **{n: {0: "batch"} for n in outputs}}, opset_version=OPSET,
                                  do_constant_folding=True)
            used = "torch.onnx (TorchScript-based)"
        except Exception as e:  # an exporter removed from a future torch, or an unsupported op
            if exporter == "torchscript":
                raise ExportError(f"torch.onnx.export (TorchScript-based) failed: {type(e).__name__}: {e}") from e
            errors.append(f"TorchScript-based: {type(e).__name__}: {e}")
    if not used:
        _require("onnxscript", "for the torch.export-based exporter")
        try:
            from torch.export import Dim

            axes = flat.dynamic_axes()
            dims = {axis: Dim(axis) for axis in dict.fromkeys(axes.values())}
            with _quiet(), _quiet_logs("torch.onnx"), torch.no_grad(), contextlib.redirect_stdout(None):
                program = torch.onnx.export(flat, example, dynamo=True, input_names=names, output_names=outputs,
                                            dynamic_shapes=(tuple({0: dims[axes[n]]} for n in names),), verbose=False)
                program.save(str(path), external_data=False)
            used = "torch.onnx (torch.export-based)"
        except Exception as e:
            errors.append(f"torch.export-based: {type(e).__name__}: {e}")
            raise ExportError("ONNX export failed: " + "; ".join(errors)) from e
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))
    return used


def _run_onnx(path: Path, names: Sequence[str]) -> Any:
    ort = _require("onnxruntime", "to check the exported model against PyTorch")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    declared = {i.name for i in session.get_inputs()}  # the exporter drops an unused input (max-pooled weights)

    def run(inputs: tuple[Tensor, ...]) -> list[Any]:
        feed = {n: t.numpy() for n, t in zip(names, inputs) if n in declared}
        return [torch.from_numpy(a) for a in session.run(None, feed)]

    return run


def export_model(model: nn.Module, path: str | Path, fmt: str, vocab_sizes: Mapping[str, int], *,
                 exporter: str = "auto", tolerance: float = TOLERANCE,
                 batch_sizes: Sequence[int] = BATCH_SIZES) -> ExportResult:
    """Export a generated model to `path` as `fmt` ("onnx" or "torchscript"), verified against PyTorch.

    The model is exported on the CPU in eval mode (its own mode and device are restored afterwards).
    `vocab_sizes` bounds the random ids of the check batches. exporter (ONNX only): "auto" (TorchScript-
    based, then torch.export-based), "torchscript" or "dynamo".
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter '{exporter}' (use {', '.join(EXPORTERS)})")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ExportError(f"batch sizes must be positive, got {tuple(batch_sizes)}")
    _check_generated(model)
    path = Path(path)
    was_training = model.training
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.cpu().eval()
    flat = FlatModel(model).eval()
    meta = _metadata(model, flat.input_names)
    try:
        example = sample_inputs(model, vocab_sizes, batch_sizes[0])
        with _temporary(path) as tmp:
            if fmt == "torchscript":
                used = _export_torchscript(flat, example, tmp, meta)
                run = _run_torchscript(tmp)
            else:
                used = _export_onnx(flat, example, tmp, meta, exporter)
                run = _run_onnx(tmp, flat.input_names)
            flat.eval()  # an exporter may have toggled modes: the reference is the eval-mode module
            per_output = _verify(run, flat, vocab_sizes, batch_sizes, tolerance)
            os.replace(tmp, path)
    finally:
        model.to(device).train(was_training)
    return ExportResult(
        path=path,
        format=fmt,
        exporter=used,
        outputs=flat.outputs,
        max_abs_diff=max(per_output.values(), default=0.0),
        per_output=per_output,
        batch_sizes=tuple(batch_sizes),
        tolerance=tolerance,
    )


def load_trained(run_dir: str | Path) -> tuple[nn.Module, dict[str, int]]:
    """The trained module of a run folder (model.py + checkpoint.pt), on the CPU in eval mode, and its vocab sizes:
    checkpoint.load_model, the run-folder loader evaluate and predict share, with its errors as ExportErrors.

    No dataset is needed: the checkpoint records the vocabulary sizes the model was built with.
    """
    from .checkpoint import load_model
    from .config import ConfigError

    try:
        return load_model(run_dir)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, exporter: str = "auto",
               tolerance: float = TOLERANCE, batch_sizes: Sequence[int] = BATCH_SIZES) -> ExportResult:
    """Export a run folder's best checkpoint; the file goes to `out` or RUN_DIR/model.onnx | model.torchscript.pt."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    model, vocab = load_trained(run_dir)
    target = Path(out) if out is not None else Path(run_dir) / DEFAULT_FILES[fmt]
    return export_model(model, target, fmt, vocab, exporter=exporter, tolerance=tolerance, batch_sizes=batch_sizes)
