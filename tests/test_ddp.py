"""Data-parallel training (Note [Distributed training]): 2 CPU processes over gloo.

1. `train()` in 2 spawned processes sharing a process group, `--batch-size B` each, ends with the same
   parameters as `train()` in this process with `--batch-size 2B` on the same data: every global batch
   of 2B rows is the same, losses are means (the masked `where` loss divides by the global count) and
   DDP averages gradients. The spec has no batch_norm (BatchNorm statistics are per process under DDP,
   as in standard DDP) and no dropout. Checked for the weightings whose gradients are exactly the global
   batch's (fixed, uwl, pcgrad, metabalance); gradnorm's weights use each rank's loss ratios, so only
   agreement of the ranks is checked. A resumed DDP run ends where an uninterrupted one does.
2. `torchrun --nproc_per_node=2 -m mtldsl train ...` end to end: exit 0, one run folder, one table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
model tiny_mmoe "MMoE without batch norm, masked CVR loss"
data synthetic
task ctr binary label click
task cvr binary label purchase where click
embedding emb shared { dim 4  fields all  dense all }
experts experts shared { count 2  input emb  mlp [16] }
gate g per task { input emb  mix experts }
tower per task { input g  mlp [8] }
loss ctr
loss cvr where click
train { lr 0.01  monitor ctr.auc  seed 3 }
"""

ROWS = 500  # 400 train rows: 4 global batches of 96 and a tail of 16 (8 per rank)
B = 48  # per process; the single-process reference uses 2 * B
EXACT = ("fixed", "uwl", "pcgrad", "metabalance")
WEIGHTINGS = (*EXACT, "gradnorm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_train(spec: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    import contextlib
    import io

    from mtldsl.runtime.trainer import train

    if not kw.get("resume"):  # fp32: the comparison is of DDP's arithmetic, to 1e-6, not of bf16 rounding
        kw.setdefault("precision", "fp32")
    with contextlib.redirect_stdout(io.StringIO()):  # the table
        return train(spec, rows=ROWS, out=out, progress=False, checkpoint_every=0, **kw)  # type: ignore[arg-type]


def _no_curve(*args: object, **kw: object) -> None:
    """runs.write_curve stand-in: matplotlib would take most of these tiny runs' time."""


def _worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    from mtldsl.runtime import runs

    runs.write_curve = _no_curve
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        root, spec = Path(tmp), Path(tmp) / "tiny.mtl"
        for name in WEIGHTINGS:
            result = _quiet_train(spec, root / f"ddp-{name}", epochs=1, batch_size=B, weighting=name, device="cpu")
            assert result.is_main == (rank == 0)
            final = {k: v.clone() for k, v in result.model.state_dict().items()}
            torch.save(final, root / f"ddp-{name}-rank{rank}.pt")
        # resume under DDP: 1 epoch, then continue to 2; against 2 epochs in one go
        _quiet_train(spec, root / "ddp-2", epochs=2, batch_size=B, device="cpu")
        _quiet_train(spec, root / "ddp-1+1", epochs=1, batch_size=B, device="cpu")
        _quiet_train(spec, root / "ddp-1+1", epochs=2, resume=True)
        dist.barrier()  # Note [Leaving a gloo group] in mtldsl/runtime/distributed.py
    finally:
        dist.destroy_process_group()


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_two_process_ddp_step_equals_one_process_on_the_global_batch(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.multiprocessing as mp

    from mtldsl.runtime import runs

    monkeypatch.setattr(runs, "write_curve", _no_curve)
    (tmp_path / "tiny.mtl").write_text(SPEC)
    procs = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                               start_method="spawn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use the two cores too
    try:
        for name in EXACT:  # single-process references, while the workers run
            _quiet_train(tmp_path / "tiny.mtl", tmp_path / f"one-{name}", epochs=1, batch_size=2 * B,
                         weighting=name, device="cpu", seed=None)
    finally:
        torch.set_num_threads(threads)
    procs.join()  # raises if a worker failed

    for name in WEIGHTINGS:
        ddp = _model(tmp_path / f"ddp-{name}")
        ranks = [torch.load(tmp_path / f"ddp-{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ddp.keys() == ranks[0].keys() == ranks[1].keys()  # unwrapped: no `module.` prefix
        for k in ddp:  # every rank holds the saved parameters: ranks never drift apart
            assert torch.equal(ranks[0][k], ddp[k]) and torch.equal(ranks[1][k], ddp[k]), f"{name}: {k}"
        assert all(torch.isfinite(v).all() for v in ddp.values()), name
        if name not in EXACT:
            continue
        one = _model(tmp_path / f"one-{name}")
        start = torch.load(tmp_path / f"one-{name}" / "last.pt", weights_only=True)
        assert start["step"] == 5  # 4 global batches of 96 and the tail of 16
        moved = max(float((one[k] - v).abs().max()) for k, v in _initial(tmp_path).items())
        assert moved > 1e-3, "the steps must move the parameters for the comparison to mean anything"
        for k in one:
            diff = float((ddp[k] - one[k]).abs().max())
            assert diff <= 1e-6, f"{name}: {k} differs from one process by {diff:.2e}"
        # metrics.json comes from rank 0 alone, history losses are the global batches' (averaged over ranks)
        m_ddp = json.loads((tmp_path / f"ddp-{name}" / "metrics.json").read_text())
        m_one = json.loads((tmp_path / f"one-{name}" / "metrics.json").read_text())
        assert m_ddp["train"]["steps"] == m_one["train"]["steps"] == 5
        for out in m_one["tasks"]:
            assert m_ddp["tasks"][out]["logloss"] == pytest.approx(m_one["tasks"][out]["logloss"], abs=1e-5)
        h_ddp = (tmp_path / f"ddp-{name}" / "history.csv").read_text().splitlines()
        h_one = (tmp_path / f"one-{name}" / "history.csv").read_text().splitlines()
        header = h_one[0].split(",")
        for col in ("train_loss_ctr", "train_loss_cvr"):
            i = header.index(col)
            assert float(h_ddp[1].split(",")[i]) == pytest.approx(float(h_one[1].split(",")[i]), abs=1e-6)

    resumed, straight = _model(tmp_path / "ddp-1+1"), _model(tmp_path / "ddp-2")
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), f"resumed DDP run differs on {k}"


def _initial(tmp: Path) -> dict[str, torch.Tensor]:
    """The untrained parameters (same seed) to show that the compared runs really trained."""
    from mtldsl.runtime import binding

    text = (tmp / "tiny.mtl").read_text()
    p = binding.prepare(text, str(tmp / "tiny.mtl"), data=None, data_dir=None, rows=ROWS, data_seed=0,
                        device=torch.device("cpu"))
    return binding.instantiate(p.cls, binding.vocab_sizes(p.cls, p.dataset.schema), 3,
                               torch.device("cpu")).state_dict()


def test_torchrun_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "mtldsl", "train", str(ROOT / "specs" / "mmoe.mtl"),
           "--rows", "2000", "--epochs", "1", "--batch-size", "256", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("output") == 1, proc.stdout  # the table header, printed by rank 0 only
    assert proc.stdout.count("run folder:") == 1, proc.stdout
    assert proc.stderr.count("epoch 1/1") == 1, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "mmoe" and m["train"]["epochs"] == 1
    assert m["train"]["steps"] == 4  # 1600 train rows, global batch 2 x 256: 3 full steps and the tail
    assert {"ctr", "cvr", "cvr@click"} <= set(m["tasks"])
    assert not list(tmp_path.glob("runs")), "no second run folder"
    assert not list(out.glob(".*.tmp"))
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and not any(k.startswith("module.") for k in ckpt["model"])
