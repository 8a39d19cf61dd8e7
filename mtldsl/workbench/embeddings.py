"""Per-task embedding tables: how far apart a user and an item sit in each table (Note [Embedding distances]).

Takes a trained run folder; gives rows (run, table, label pattern, mean cosine distance, rows) for every
table that holds both the user-id and the item-id field, when the spec has a per-task table (else nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["id_fields", "table_distances"]

# Note [Embedding distances]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# STEM's contradictory-preference analysis (Su et al., AAAI 2024) asks whether per-task tables let the same
# user-item pair sit close in one task's space and far in another's, which one shared table cannot do. For
# every test row, each table that holds both id fields gives the user's and the item's embedding rows
# (FusedEmbedding: field f of value v is row offsets[f] + v); we report 1 - cos(user, item), averaged over
# the rows of each label pattern of the binary tasks (e.g. `ctr=1 cvr=0`: clicked, not bought), table by
# table. Where task A's table puts its positives closer than its negatives while task B's table does the
# opposite on the same rows, the tables hold contradictory preferences. The id fields are the dataset's
# `user_id` and `item_id` groups (Ali-CCP, synthetic), else the gAUC user id and the first `item` field.


def id_fields(schema: Any) -> tuple[str, str] | None:
    """(user id field, item id field) of a dataset schema, or None when it does not say."""
    groups = schema.groups
    user = (groups.get("user_id") or ((schema.user_id,) if schema.user_id else (None,)))[0]
    item = (groups.get("item_id") or groups.get("item") or (None,))[0]
    if user is None or item is None or user not in schema.sparse or item not in schema.sparse:
        return None
    return user, item


def _patterns(labels: dict[str, np.ndarray], tasks: list[tuple[str, str]]) -> np.ndarray:
    parts = [np.where(labels[key] > 0.5, f"{task}=1", f"{task}=0") for task, key in tasks]
    out = parts[0]
    for p in parts[1:]:
        out = np.char.add(np.char.add(out, " "), p)
    return out


def table_distances(run_dir: Path, name: str, batch_size: int = 8192) -> list[dict[str, Any]]:
    """Note [Embedding distances] for one run; [] without per-task tables or id fields."""
    from ..runtime.checkpoint import load_run

    loaded = load_run(run_dir)
    model_ir = loaded.prepared.checked.model
    assert model_ir is not None
    ids = id_fields(loaded.prepared.dataset.schema)
    if ids is None or not any(t.per_task for t in model_ir.embeddings):
        return []
    tables = [t for t in model_ir.embeddings if ids[0] in t.fields and ids[1] in t.fields and t.copies == 1]
    sparse = list(loaded.prepared.cls.SPARSE_FIELDS)
    cu, ci = sparse.index(ids[0]), sparse.index(ids[1])
    tasks = [(m.output, m.label) for m in loaded.prepared.objective.metrics if m.mask is None
             and m.kind.value == "binary" and m.key == m.output]
    dist: dict[str, list[np.ndarray]] = {t.name: [] for t in tables}
    patterns: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in loaded.prepared.splits["test"].batches(batch_size, shuffle=False):
            ids_batch = batch["sparse"].to(loaded.device)
            for t in tables:
                module = getattr(loaded.model, t.name)
                offsets = module.offsets
                weight = module.embedding.weight
                u = weight[ids_batch[:, cu].long() + offsets[t.fields.index(ids[0])]].float()
                i = weight[ids_batch[:, ci].long() + offsets[t.fields.index(ids[1])]].float()
                cos = torch.nn.functional.cosine_similarity(u, i, dim=-1)
                dist[t.name].append((1.0 - cos).cpu().numpy())
            labels = {key: batch["labels"][key].float().cpu().numpy().reshape(-1) for _, key in tasks}
            patterns.append(_patterns(labels, tasks) if tasks else np.full(len(ids_batch), "all"))
    pattern = np.concatenate(patterns)
    rows = []
    for t in tables:
        d = np.concatenate(dist[t.name])
        for p in ["all", *sorted(set(pattern.tolist()) - {"all"})]:
            keep = np.ones(len(d), dtype=bool) if p == "all" else pattern == p
            rows.append({"run": name, "table": t.name, "fields": f"{ids[0]}-{ids[1]}", "rows_with": p,
                         "distance": float(d[keep].mean()) if keep.any() else float("nan"), "rows": int(keep.sum())})
    return rows
