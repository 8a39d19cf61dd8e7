"""mtldsl vs torch-rechub: training and prediction throughput, peak memory and test AUC.

Both sides train the same architecture (parameter counts asserted equal) on the same synthetic
Ali-CCP-shaped rows with the same batch size, each through its own trainer: mtldsl's generic
trainer (`mtldsl.runtime.trainer.train`) and torch-rechub's `MTLTrainer.train_one_epoch` over its
`DataGenerator` loaders. Each (side, seed) runs in a fresh process, alternating sides, so peak
RSS is per side. torch-rechub is a benchmark-only dependency (`pip install torch-rechub==0.9.0`).

    python benchmarks/vs_torch_rechub.py --model mmoe --rows 200000 --seeds 3
    python benchmarks/vs_torch_rechub.py --model all --rows 200000 --seeds 1
    python benchmarks/vs_torch_rechub.py --model shared_bottom --vocab-scale 1000
    python benchmarks/vs_torch_rechub.py --model mmoe --precision fp32 --rechub-precision bf16

--precision sets mtldsl's (auto: bf16 autocast where the CPU multiplies bf16 natively, AVX512-BF16
or AMX; else fp32; Note [Mixed precision] in mtldsl/runtime/precision.py). torch-rechub trains in fp32
as shipped; --rechub-precision bf16 wraps its training and prediction in the same bf16 autocast, for
a same-precision comparison.

--vocab-scale K spreads each field's ids over K times its synthetic vocabulary (a random one-to-one
map, so the data carries the same information), as on real data whose tables hold millions of ids
of which a batch touches a few thousand: K=1000 makes the shared table 1.53M rows (98 MiB). The data
is then written once as a dataset folder (Parquet + schema.json) that both sides load.

Printed per model: samples/s (train, predict) for both (medians over seeds), the ratios (median of
each seed's back-to-back pair), peak RSS, test AUC per task
(mean and spread over seeds), and training speed as a share of the model's FLOP bound on this
machine (dense FLOPs per training sample = 6 x multiply-adds of every dense weight, against the
GEMM rate of the precision mtldsl trained in, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shared_bottom", "esmm", "mmoe", "ple", "aitm")

# PLE as the table measures it: one level, 2 specific experts per task + 1 shared expert.
PLE_1_LEVEL = """
model ple_bench "PLE, 1 level, 2 specific + 1 shared experts"
data synthetic
task ctr binary label click
task cvr binary label purchase
embedding emb shared { dim 16  fields all  dense all }
experts specific per task { count 2  input emb  mlp [256, 128]  batch_norm true }
experts shared_experts shared { count 1  input emb  mlp [256, 128]  batch_norm true }
gate g per task { input emb  mix specific[own]  mix shared_experts  batch_norm true }
tower per task { input g  mlp [8]  batch_norm true }
loss ctr
loss cvr
"""


def spec_path(model: str, tmp: Path) -> Path:
    if model == "ple":
        path = tmp / "ple_bench.mtl"
        path.write_text(PLE_1_LEVEL)
        return path
    return ROOT / "specs" / f"{model}.mtl"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast(precision: str):  # noqa: ANN201
    """The trainer's bf16 autocast on the CPU for precision "bf16" (Note [Mixed precision]); a no-op for fp32.
    Wraps both sides' work alike: ours for prediction (its trainer sets it for training), torch-rechub's for all."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def gemm_gflops(dtype) -> float:
    import torch

    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 512, dtype=dtype)
    for _ in range(10):  # warm the thread pool and caches
        a @ b
    best, n = 0.0, 20
    for _ in range(5):  # the best of 5 rounds: a busy moment must not shrink the bound
        t = time.perf_counter()
        for _ in range(n):
            a @ b
        best = max(best, 2 * 1024 * 1024 * 512 * n / (time.perf_counter() - t) / 1e9)
    return best


# ---- one side, one seed (runs in its own process) ----------------------------------------------


def load(data: str, rows: int):
    """The benchmark's dataset: synthetic rows, or the folder the driver wrote (--vocab-scale)."""
    from mtldsl.runtime.data import load_dataset

    return load_dataset(data, rows=rows if data == "synthetic" else None, seed=0)


def write_scaled(rows: int, scale: int, folder: Path) -> None:
    """The synthetic rows with each field's ids mapped one-to-one into `scale` x its vocabulary (Parquet)."""
    import dataclasses

    import numpy as np
    import pandas as pd

    from mtldsl.catalog import schema_to_json

    ds = load("synthetic", rows)
    schema = ds.schema
    rng = np.random.default_rng(12345)
    vocab = {f: schema.vocab_sizes[f] * scale for f in schema.sparse}
    maps = {f: rng.choice(vocab[f], size=schema.vocab_sizes[f], replace=False) for f in schema.sparse}
    for name in ("train", "val", "test"):
        split = ds.split(name)
        cols = {c: split.labels[c].numpy() for c in schema.labels}
        cols.update({f: maps[f][split.sparse[:, i].numpy()] for i, f in enumerate(schema.sparse)})
        cols.update({f: split.dense[:, i].numpy() for i, f in enumerate(schema.dense)})
        pd.DataFrame(cols).to_parquet(folder / f"{name}.parquet", index=False)
    scaled = dataclasses.replace(schema, name="synthetic_scaled", vocab_sizes=vocab)
    (folder / "schema.json").write_text(schema_to_json(scaled, with_vocab=True))


def run_ours(model: str, data: str, rows: int, batch: int, seed: int, threads: int, epochs: int,
             precision: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    from mtldsl.runtime.trainer import dense_macs, train

    with tempfile.TemporaryDirectory() as tmp:
        spec = spec_path(model, Path(tmp))
        result = train(spec, data=data, rows=rows if data == "synthetic" else None, epochs=epochs,
                       batch_size=batch, seed=seed, out=str(Path(tmp) / "run"), progress=False,
                       patience=epochs + 1, precision=precision)
        metrics = result.metrics
        rss_train = peak_rss_mib()  # before the benchmark's own second data load below
        net = result.model.cpu()
        ds = load(data, rows)
        cols = [ds.schema.sparse.index(f) for f in net.SPARSE_FIELDS]
        dcols = [ds.schema.dense.index(f) for f in net.DENSE_FIELDS]
        sparse, dense = ds.test.sparse[:, cols].contiguous(), ds.test.dense[:, dcols].contiguous()
        net.eval()
        t = time.perf_counter()
        with torch.inference_mode(), autocast(metrics["train"]["precision"]):
            for i in range(0, len(sparse), batch):
                net({"sparse": sparse[i:i + batch], "dense": dense[i:i + batch]})
        predict = len(sparse) / (time.perf_counter() - t)
        tasks = metrics["tasks"]
        return {
            "params": metrics["params"],
            "train_sps": metrics["train"]["samples_per_second"],
            "predict_sps": predict,
            "auc": {k: tasks[k]["auc"] for k in ("ctr", "cvr") if k in tasks},
            "macs": dense_macs(net),  # the trainer's own count (Note [Mixed precision])
            "rss_mib": rss_train,
            "sparse": metrics["train"]["sparse_embeddings"],
            "precision": metrics["train"]["precision"],
        }


def run_rechub(model: str, data: str, rows: int, batch: int, seed: int, threads: int, epochs: int,
               precision: str) -> dict:
    import numpy as np
    import torch
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom
    from torch_rechub.trainers import MTLTrainer
    from torch.utils.data import DataLoader
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    ds = load(data, rows)
    schema = ds.schema
    vocab = dict(schema.vocab_sizes)
    sparse = [SparseFeature(f, vocab_size=vocab[f], embed_dim=16) for f in schema.sparse]
    dense = [DenseFeature(f) for f in schema.dense]
    tasks = ["classification", "classification"]
    tower = {"dims": [8]}
    if model == "shared_bottom":
        net = SharedBottom(sparse + dense, tasks, bottom_params={"dims": [117]}, tower_params_list=[tower, tower])
    elif model == "mmoe":
        net = MMOE(sparse + dense, tasks, n_expert=8, expert_params={"dims": [256, 128]}, tower_params_list=[tower, tower])
    elif model == "ple":
        net = PLE(sparse + dense, tasks, n_level=1, n_expert_specific=2, n_expert_shared=1,
                  expert_params={"dims": [256, 128]}, tower_params_list=[tower, tower])
    elif model == "esmm":
        user = set(schema.groups["user"])
        net = ESMM([f for f in sparse if f.name in user], [f for f in sparse if f.name not in user],
                   cvr_params={"dims": [16, 8]}, ctr_params={"dims": [16, 8]})
    elif model == "aitm":
        net = AITM(sparse + dense, n_task=2, bottom_params={"dims": [32, 16]}, tower_params_list=[tower, tower])
    else:
        raise SystemExit(f"unknown model {model}")

    def frame(split):
        x = {f: split.sparse[:, i].numpy() for i, f in enumerate(schema.sparse)}
        x.update({f: split.dense[:, i].numpy() for i, f in enumerate(schema.dense)})
        click, buy = split.labels["click"].numpy(), split.labels["purchase"].numpy()
        y = np.stack([buy, click, click * buy], 1) if model == "esmm" else np.stack([click, buy], 1)
        return x, y

    (xtr, ytr), (xva, yva), (xte, yte) = frame(ds.train), frame(ds.val), frame(ds.test)
    train_dl, _, test_dl = DataGenerator(xtr, ytr).generate_dataloader(
        x_val=xva, y_val=yva, x_test=xte, y_test=yte, batch_size=batch)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(net, tasks + (["classification"] if model == "esmm" else []),
                             optimizer_params={"lr": 1e-3, "weight_decay": 0.0}, n_epoch=epochs,
                             earlystop_patience=epochs + 1, device="cpu", model_path=tmp)
        t = time.perf_counter()
        for _ in range(epochs):
            with autocast(precision):
                trainer.train_one_epoch(train_dl)
        train_sps = epochs * len(ytr) / (time.perf_counter() - t)
        t = time.perf_counter()
        with autocast(precision):
            trainer.predict(net, DataLoader(PredictDataset(xte), batch_size=batch))
        predict_sps = len(yte) / (time.perf_counter() - t)
        with autocast(precision):
            scores = trainer.evaluate(net, test_dl)
    auc = {"cvr": scores[0], "ctr": scores[1]} if model == "esmm" else {"ctr": scores[0], "cvr": scores[1]}
    return {"params": sum(p.numel() for p in net.parameters()), "train_sps": train_sps, "predict_sps": predict_sps,
            "auc": auc, "rss_mib": peak_rss_mib()}


# ---- driver -------------------------------------------------------------------------------------


def one(side: str, model: str, args: argparse.Namespace, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--model", model, "--data", args.data, "--rows", str(args.rows),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--epochs", str(args.epochs),
           "--seed", str(seed), "--precision", args.precision if side == "ours" else args.rechub_precision]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f}±{statistics.stdev(values):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmoe", help=f"one of {', '.join(MODELS)}, a comma-separated list, or 'all'")
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows (80%% train)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-scale", type=int, default=1, help="spread each field's ids over K x its vocabulary")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="mtldsl's --precision")
    ap.add_argument("--rechub-precision", choices=("fp32", "bf16"), default="fp32",
                    help="torch-rechub's: fp32 as shipped, or under the same bf16 autocast")
    ap.add_argument("--data", default="synthetic", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=("ours", "rechub"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_ours if args.side == "ours" else run_rechub
        print(json.dumps(fn(args.model, args.data, args.rows, args.batch_size, args.seed, args.threads, args.epochs,
                            args.precision)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.vocab_scale > 1:
            write_scaled(args.rows, args.vocab_scale, Path(tmp))
            args.data = tmp
        drive(args)


def drive(args: argparse.Namespace) -> None:

    import torch

    torch.set_num_threads(args.threads)
    gflops, bf16_gflops = gemm_gflops(torch.float32), gemm_gflops(torch.bfloat16)
    models = MODELS if args.model == "all" else tuple(args.model.split(","))
    print(f"rows {args.rows} (train {int(args.rows * 0.8)}), batch {args.batch_size}, {args.epochs} epoch(s), "
          f"{args.threads} threads, {args.seeds} seed(s), vocab x{args.vocab_scale}; fp32 GEMM {gflops:.0f} GFLOP/s, "
          f"bf16 GEMM {bf16_gflops:.0f} GFLOP/s; torch-rechub in {args.rechub_precision}")
    header = (f"{'model':<14}{'params':>10}{'train/s ours':>14}{'rechub':>9}{'ratio':>7}{'predict/s ours':>16}"
              f"{'rechub':>9}{'ratio':>7}{'RSS MiB ours':>14}{'rechub':>8}{'FLOP bound':>12}"
              f"{'ctr AUC ours':>15}{'rechub':>15}{'cvr AUC ours':>15}{'rechub':>15}{'emb grads':>11}{'precision':>11}")
    print(header)
    for model in models:
        runs: dict[str, list[dict]] = {"ours": [], "rechub": []}
        for seed in range(args.seeds):
            order = ("ours", "rechub") if seed % 2 == 0 else ("rechub", "ours")
            for side in order:
                runs[side].append(one(side, model, args, seed))
        ours, theirs = runs["ours"], runs["rechub"]
        assert ours[0]["params"] == theirs[0]["params"], f"{model}: params {ours[0]['params']} vs {theirs[0]['params']}"
        med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
        # the ratio of each seed's pair of runs (back to back), then the median: drifts in machine speed
        # between seeds (this VM moves by 30 % over minutes) cancel within a pair
        ratio = lambda k: statistics.median(a[k] / b[k] for a, b in zip(ours, theirs))  # noqa: E731
        rate = bf16_gflops if ours[0]["precision"] == "bf16" else gflops  # the bound of the precision it ran in
        bound = rate * 1e9 / (6 * ours[0]["macs"])
        print(f"{model:<14}{ours[0]['params']:>10}{med(ours, 'train_sps'):>14.0f}{med(theirs, 'train_sps'):>9.0f}"
              f"{ratio('train_sps'):>7.2f}{med(ours, 'predict_sps'):>16.0f}"
              f"{med(theirs, 'predict_sps'):>9.0f}{ratio('predict_sps'):>7.2f}"
              f"{med(ours, 'rss_mib'):>14.0f}{med(theirs, 'rss_mib'):>8.0f}"
              f"{100 * med(ours, 'train_sps') / bound:>11.0f}%"
              f"{spread([r['auc']['ctr'] for r in ours]):>15}{spread([r['auc']['ctr'] for r in theirs]):>15}"
              f"{spread([r['auc']['cvr'] for r in ours]):>15}{spread([r['auc']['cvr'] for r in theirs]):>15}"
              f"{'sparse' if ours[0]['sparse'] else 'dense':>11}{ours[0]['precision']:>11}",
              flush=True)


if __name__ == "__main__":
    main()
