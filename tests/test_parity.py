"""Parameter-count parity with torch-rechub 0.9.0 (a test-only dependency; the product never imports it).

Configuration, shared by both sides: the synthetic dataset's Ali-CCP field layout (23 sparse
fields, embedding dim 16, 8 dense fields where the spec reads them), vocabulary sizes below,
two binary tasks. Per model, the torch-rechub arguments mirror the shipped spec:
  shared_bottom  bottom_params dims [117], towers [8]
  mmoe           8 experts [256, 128], towers [8]
  ple            2 levels, 1 specific + 1 shared expert [16], towers [8]
  esmm           sparse only (user fields + item fields = all 23), towers [16, 8]
  aitm           bottoms [32, 16], towers [8]
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mtldsl
from mtldsl.catalog import schema_for

rechub = pytest.importorskip("torch_rechub")
from torch_rechub.basic.features import DenseFeature, SparseFeature  # noqa: E402
from torch_rechub.models.multi_task import AITM, ESMM, MMOE, PLE, SharedBottom  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "specs"
SCHEMA = schema_for("synthetic")
VOCAB = {f: 10 + 7 * i for i, f in enumerate(SCHEMA.sparse)}  # distinct sizes catch a swapped field
TASKS = ["classification", "classification"]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def sparse_features() -> list:
    return [SparseFeature(f, vocab_size=VOCAB[f], embed_dim=16) for f in SCHEMA.sparse]


def all_features() -> list:
    return sparse_features() + [DenseFeature(f) for f in SCHEMA.dense]


def reference(name: str):
    tower = {"dims": [8]}
    if name == "shared_bottom":
        return SharedBottom(all_features(), TASKS, bottom_params={"dims": [117]}, tower_params_list=[tower, tower])
    if name == "mmoe":
        return MMOE(all_features(), TASKS, n_expert=8, expert_params={"dims": [256, 128]},
                    tower_params_list=[tower, tower])
    if name == "ple":
        return PLE(all_features(), TASKS, n_level=2, n_expert_specific=1, n_expert_shared=1,
                   expert_params={"dims": [16]}, tower_params_list=[tower, tower])
    if name == "esmm":
        user = set(SCHEMA.groups["user"])
        feats = sparse_features()
        return ESMM([f for f in feats if f.name in user], [f for f in feats if f.name not in user],
                    cvr_params={"dims": [16, 8]}, ctr_params={"dims": [16, 8]})
    if name == "aitm":
        return AITM(all_features(), n_task=2, bottom_params={"dims": [32, 16]}, tower_params_list=[tower, tower])
    raise KeyError(name)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "esmm", "aitm"])
def test_parameter_count_equals_torch_rechub(name: str) -> None:
    ours = mtldsl.build_model(SPECS / f"{name}.mtl", VOCAB)
    theirs = reference(name)
    assert n_params(ours) == n_params(theirs), f"{name}: mtldsl {n_params(ours)} vs torch-rechub {n_params(theirs)}"


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "ple", "esmm", "aitm"])
def test_buffer_shapes_match_batch_norm_layout(name: str) -> None:
    """Same number of BatchNorm running-stat entries: the same layers carry batch norm."""
    ours = mtldsl.build_model(SPECS / f"{name}.mtl", VOCAB)
    theirs = reference(name)
    count = lambda m: sum(b.numel() for n, b in m.named_buffers() if n.endswith("running_mean"))  # noqa: E731
    assert count(ours) == count(theirs)
