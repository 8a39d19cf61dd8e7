"""Every shipped spec exports to ONNX and TorchScript with outputs matching PyTorch within 1e-5.

Run folders are built by hand (compile the spec, instantiate with small vocabularies, randomise the
BatchNorm statistics so eval mode matters, save the state dict) the way the trainer writes them; one
test also exports a folder the real trainer wrote. Each exported file is checked twice: by the
exporter's own verification and here, independently, on a fresh batch.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mtldsl
import mtldsl.pipeline
from mtldsl.runtime import export as E
from mtldsl.runtime import runs
from mtldsl.runtime.checkpoint import FORMAT

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.mtl"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: threads only add overhead on a loaded 2-core box
    yield
    torch.set_num_threads(threads)


def make_run(folder: Path, spec: Path, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """A run folder as the trainer writes it: spec.mtl, model.py, checkpoint.pt, metrics.json."""
    source = mtldsl.compile_spec(spec)
    module = mtldsl.load_module(source, f"run_{spec.stem}")
    cls = next(v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "OUTPUTS"))
    vocab = {f: 5 + (7 * i) % 23 for i, f in enumerate(cls.SPARSE_FIELDS)}  # small, different per field
    torch.manual_seed(seed)
    model = cls(vocab)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runs.SPEC).write_text(spec.read_text())
    (folder / runs.MODEL_SOURCE).write_text(source)
    torch.save({"format": FORMAT, "model": model.state_dict(), "vocab_sizes": vocab}, folder / runs.CHECKPOINT)
    (folder / runs.METRICS).write_text(json.dumps({"model": spec.stem}))
    return folder, vocab


def reference(run_dir: Path, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model, _ = E.load_trained(run_dir)
    batch = {"sparse": inputs[0]} if len(inputs) == 1 else {"sparse": inputs[0], "dense": inputs[1]}
    with torch.no_grad():
        out = model(batch)
    return model, [out[k] for k in model.OUTPUTS]


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_torchscript_matches_pytorch(spec: Path, tmp_path: Path) -> None:
    run_dir, vocab = make_run(tmp_path / "run", spec)
    result = E.export_run(run_dir, "torchscript")
    assert result.path == run_dir / "model.torchscript.pt" and result.path.is_file()
    assert result.max_abs_diff <= 1e-5 and result.exporter == "torch.jit.trace"
    model, _ = E.load_trained(run_dir)
    inputs = E.sample_inputs(model, vocab, 3, seed=99)
    _, expected = reference(run_dir, inputs)
    extra = {"mtldsl.json": ""}
    loaded = torch.jit.load(str(result.path), _extra_files=extra)
    got = loaded(*inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (3,)
        assert (g - e).abs().max().item() <= 1e-5
    meta = json.loads(extra["mtldsl.json"])
    assert meta["outputs"] == json.dumps(list(model.OUTPUTS)) and meta["sparse_fields"] == json.dumps(list(model.SPARSE_FIELDS))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_onnx_matches_pytorch(spec: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnx onnxruntime)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxruntime)")
    run_dir, vocab = make_run(tmp_path / "run", spec)
    target = tmp_path / "exported" / "m.onnx"
    result = E.export_run(run_dir, "onnx", target)
    assert result.path == target and target.is_file() and result.max_abs_diff <= 1e-5
    assert set(result.per_output) == set(result.outputs)
    model, _ = E.load_trained(run_dir)
    proto = onnx.load(str(target))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["outputs"]) == list(model.OUTPUTS)
    assert [o.name for o in proto.graph.output] == list(model.OUTPUTS)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["sparse", "dense"] if model.DENSE_FIELDS else ["sparse"])
    for batch in (3, 130):
        inputs = E.sample_inputs(model, vocab, batch, seed=batch)
        _, expected = reference(run_dir, inputs)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        for g, e in zip(got, expected):
            assert g.shape == (batch,)
            assert np.abs(g - e.numpy()).max() <= 1e-5


def test_onnx_torch_export_based_path(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    run_dir, _ = make_run(tmp_path / "run", ROOT / "specs" / "esmm.mtl")
    result = E.export_run(run_dir, "onnx", exporter="dynamo")
    assert result.exporter == "torch.onnx (torch.export-based)" and result.max_abs_diff <= 1e-5


def test_a_mismatch_fails_loudly_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    run_dir, _ = make_run(tmp_path / "run", ROOT / "specs" / "mmoe.mtl")
    real = E._run_torchscript

    def broken(path):
        run = real(path)
        return lambda inputs: [t + 1e-3 for t in run(inputs)]

    monkeypatch.setattr(E, "_run_torchscript", broken)
    with pytest.raises(E.ExportError, match=r"differ from PyTorch beyond 1e-05: 'ctr' max \|diff\| 0\.001"):
        E.export_run(run_dir, "torchscript")
    assert not (run_dir / "model.torchscript.pt").exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_missing_onnx_package_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    run_dir, _ = make_run(tmp_path / "run", ROOT / "specs" / "shared_bottom.mtl")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(E.ExportError, match="needs the 'onnx' package.*pip install onnx onnxruntime"):
        E.export_run(run_dir, "onnx")
    assert not (run_dir / "model.onnx").exists()


def test_bad_run_folders(tmp_path: Path) -> None:
    with pytest.raises(E.ExportError, match="no such run folder"):
        E.export_run(tmp_path / "nowhere", "onnx")
    run_dir, _ = make_run(tmp_path / "run", ROOT / "specs" / "esmm.mtl")
    model_state = torch.load(run_dir / runs.CHECKPOINT)["model"]
    torch.save({"format": FORMAT, "model": model_state}, run_dir / runs.CHECKPOINT)
    with pytest.raises(E.ExportError, match="no 'vocab_sizes'"):
        E.export_run(run_dir, "torchscript")
    torch.save({"model": model_state, "vocab_sizes": {}}, run_dir / runs.CHECKPOINT)  # no format: not the trainer's
    with pytest.raises(E.ExportError, match=r"not an mtldsl checkpoint \(format 1\)"):
        E.export_run(run_dir, "torchscript")
    (run_dir / runs.CHECKPOINT).unlink()
    with pytest.raises(E.ExportError, match="not a finished run folder"):
        E.export_run(run_dir, "torchscript")
    with pytest.raises(E.ExportError, match="unknown export format"):
        E.export_run(run_dir, "tflite")


def test_export_keeps_the_model_mode_and_device(tmp_path: Path) -> None:
    _, vocab = make_run(tmp_path / "run", ROOT / "specs" / "esmm.mtl")
    model, _ = E.load_trained(tmp_path / "run")
    model.train()
    E.export_model(model, tmp_path / "m.pt", "torchscript", vocab)
    assert model.training and all(m.training for m in model.modules())


def test_cli_export(tmp_path: Path) -> None:
    from mtldsl.cli import app

    run_dir, _ = make_run(tmp_path / "run", ROOT / "specs" / "stem.mtl")
    r = CliRunner().invoke(app, ["export", str(run_dir), "--format", "torchscript"])
    assert r.exit_code == 0, r.output
    assert "model.torchscript.pt: written" in r.output and "max |diff|" in r.output
    if importlib.util.find_spec("onnxruntime") is not None:
        r = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "x.onnx")])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "x.onnx").is_file()
    r = CliRunner().invoke(app, ["export", str(run_dir), "--format", "pickle"])
    assert r.exit_code == 1 and "unknown export format 'pickle'" in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--format", "onnx"])
    assert r.exit_code == 1 and "no such run folder" in r.output and "Traceback" not in r.output


def test_a_run_folder_written_by_the_trainer_exports(tmp_path: Path) -> None:
    trainer = pytest.importorskip("mtldsl.runtime.trainer")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    result = trainer.train(ROOT / "specs" / "shared_bottom.mtl", rows=2000, epochs=1, batch_size=256,
                           out=tmp_path / "run", progress=False, device="cpu")
    for fmt in E.FORMATS:
        exported = E.export_run(result.run_dir, fmt)
        assert exported.max_abs_diff <= 1e-5 and exported.path.parent == result.run_dir


# ---- list fields (Note [List fields]) -------------------------------------------------------------

LIST_TABLES = {  # one pooled table per case, beside a plain one; clicked_items is weighted, the others are not
    "shop_lists": None,  # tests/golden/shop_lists.mtl: weighted mean, mean with copies, weighted sum, max
    **{f"{pool}_{kind}": f"embedding pooled {{ dim 4  fields [city, {fields}]  pool {pool} }}"
       for pool in ("sum", "mean", "max")
       for kind, fields in (("plain", 'tags, "109_14"'), ("weighted", "clicked_items, tags"))},
}


def pooled_model(case: str, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, dict[str, int]]:
    monkeypatch.chdir(ROOT)  # `data "tests/data/shop"`
    table = LIST_TABLES[case]
    spec = Path("tests/golden/shop_lists.mtl")
    if table is not None:
        text = (f'model m\ndata "tests/data/shop"\ntask ctr binary label click\n{table}\n'
                "embedding emb { dim 4  fields all  dense all }\ntower ctr { input concat(emb, pooled)  mlp [8] }\nloss ctr\n")
        spec = Path(f"/tmp/{case}.mtl")
        checked = mtldsl.pipeline.check_text(text, str(spec))
        assert checked.ok, checked.diagnostics
    else:
        checked = mtldsl.load_spec(spec)
    torch.manual_seed(0)
    model = mtldsl.build_model(checked, 30)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.weight.normal_()
    return model.eval(), {f: 30 for f in (*model.SPARSE_FIELDS, *model.LIST_FIELDS)}


@pytest.mark.parametrize("fmt", E.FORMATS)
@pytest.mark.parametrize("case", list(LIST_TABLES))
def test_pooled_lists_export_and_match_pytorch(case: str, fmt: str, tmp_path: Path, monkeypatch) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnx onnxruntime)")
    model, vocab = pooled_model(case, monkeypatch)
    flat = E.FlatModel(model)
    keys = E.list_keys(model)
    assert flat.input_names == ["sparse", "dense", *keys]
    assert keys[:3] == ["clicked_items.ids", "clicked_items.offsets", "clicked_items.weights"] or "weighted" not in case
    result = E.export_model(model, tmp_path / f"m.{fmt}", fmt, vocab)
    assert result.max_abs_diff <= 1e-5
    inputs = E.sample_inputs(model, vocab, 11, seed=7)  # a fresh batch, checked here independently
    with torch.no_grad():
        expected = flat(*inputs)
    if fmt == "torchscript":
        got = torch.jit.load(str(result.path))(*inputs)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        dropped = ["clicked_items.weights"] if case == "max_weighted" else []  # max ignores weights: an unused input
        assert names == [n for n in flat.input_names if n not in dropped]
        feed = {n: t.numpy() for n, t in zip(flat.input_names, inputs) if n in names}
        got = [torch.from_numpy(a) for a in session.run(None, feed)]
    for g, e in zip(got, expected):
        assert g.shape == e.shape == (11,)
        assert (g - e).abs().max().item() <= 1e-5


def test_sample_inputs_hold_bags_with_an_empty_list(monkeypatch) -> None:
    model, vocab = pooled_model("shop_lists", monkeypatch)
    inputs = dict(zip(E.FlatModel(model).input_names, E.sample_inputs(model, vocab, 6)))
    for f in model.LIST_FIELDS:
        ids, offsets = inputs[f"{f}.ids"], inputs[f"{f}.offsets"]
        assert offsets.shape == (6,) and offsets[0] == 0 and offsets[1] == offsets[2]  # sample 1: empty
        assert ids.dtype == torch.long and int(ids.max()) < 30 and ids.shape[0] >= int(offsets[-1])
    assert inputs["clicked_items.weights"].shape == inputs["clicked_items.ids"].shape
    with pytest.raises(E.ExportError, match="no vocabulary size for field.*'109_14'"):
        E.sample_inputs(model, {f: 30 for f in model.SPARSE_FIELDS}, 4)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_lists_pass_torch_export_with_dynamic_sizes(pool: str, monkeypatch) -> None:
    """What the torch.export-based ONNX exporter (the fallback, which needs onnxscript) traces first: no guard on the
    batch size or the list lengths (a batch of 1 must pass)."""
    from torch.export import Dim

    model, vocab = pooled_model(f"{pool}_weighted", monkeypatch)
    flat = E.FlatModel(model).eval()
    axes = flat.dynamic_axes()
    assert axes == {"sparse": "batch", "dense": "batch", "clicked_items.ids": "n_0", "clicked_items.offsets": "batch",
                    "clicked_items.weights": "n_0", "tags.ids": "n_1", "tags.offsets": "batch"}
    dims = {axis: Dim(axis) for axis in dict.fromkeys(axes.values())}
    with torch.no_grad():
        program = torch.export.export(flat, E.sample_inputs(model, vocab, 16),
                                      dynamic_shapes=(tuple({0: dims[axes[n]]} for n in flat.input_names),))
        for batch in (1, 5):
            inputs = E.sample_inputs(model, vocab, batch, seed=batch)
            for got, expected in zip(program.module()(*inputs), flat(*inputs)):
                assert (got - expected).abs().max().item() <= 1e-5
