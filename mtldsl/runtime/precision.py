"""Device and autocast choice: a `--device` / `--precision` setting and a model -> torch.device, "fp32" | "bf16".

Gives `resolve_device`, `resolve_precision` (with `native_bf16` and `dense_macs`, what `auto` reads) and
`forward`, the one place a generated model runs under autocast (training steps, evaluation, predictions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..vocab import names
from .config import ConfigError, Precision, choice

__all__ = ["BF16_AUTO_MACS", "dense_macs", "forward", "native_bf16", "resolve_device", "resolve_precision"]

BF16_AUTO_MACS = 32 << 10  # `auto` on a CPU: bf16 from this many dense multiply-adds per sample (measured crossover)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; anything else must name a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available here (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported (auto, cpu, cuda, cuda:N)")
    return dev


# Note [Mixed precision]
# ~~~~~~~~~~~~~~~~~~~~~~~
# With precision bf16 the forward pass runs under torch.autocast(bfloat16): matmuls (the experts'
# GEMMs, where MMoE/PLE spend their time) take bf16 operands and accumulate in float32, while the
# parameters, the optimizer state, the embedding tables and every loss stay float32. `auto` picks
# bf16 where the device multiplies bf16 natively -- CUDA with bf16 support, or a CPU with AVX512-BF16
# or AMX (measured on a 2-core AMD EPYC with AVX512-BF16: 4x the fp32 GEMM rate, MMoE trains 1.9x
# faster with the same test AUC over 3 seeds; benchmarks/RESULTS.md) -- and float32 elsewhere, where
# emulated bf16 would be slower. On a CPU, `auto` also wants BF16_AUTO_MACS dense multiply-adds per
# sample: below that the casts cost more than the GEMMs save (measured, interleaved runs of the
# trainer step: AITM, 26k, 0.87x in bf16; ESMM, 12k, 0.95x; the shipped 2-level PLE, 22k, 0.77x;
# SharedBottom, 46k, 1.35x; single_task, 137k, 1.8x; MMoE, 1.04M, 1.9x). Tower.head computes each
# logit in float32 (layers.py Note [Float32 logits]), so outputs keep full resolution for AUC, and an
# embedding table casts its output once for all readers (Note [One cast per table]). Exported
# models (export.py) are float32.


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA bf16 support; CPU AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def dense_macs(model: nn.Module) -> int:
    """Multiply-adds per sample of the model's dense layers: every nn.Linear weight and BatchedExperts' stacked
    weights (the generated module's own copy of the class, hence matched by name)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        elif type(m).__name__ == "BatchedExperts":
            total += sum(w.numel() for w in m.weights)
    return total


def resolve_precision(name: str, device: torch.device, macs: int) -> str:
    """`auto` -> bf16 where native_bf16(device) (on a CPU, for a model of at least BF16_AUTO_MACS dense
    multiply-adds per sample), else fp32; fp32 and bf16 as given (Note [Mixed precision])."""
    choice("precision", name, names(Precision))
    if name == Precision.auto.value:
        big_enough = device.type == "cuda" or macs >= BF16_AUTO_MACS
        return Precision.bf16.value if big_enough and native_bf16(device) else Precision.fp32.value
    return name


def forward(model: nn.Module, batch: Mapping[str, Any], device: torch.device, precision: str) -> dict[str, Tensor]:
    """The model's outputs on a batch's inputs, under bf16 autocast for precision bf16 (none for fp32); losses
    and metrics are always computed in float32 outside it."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == Precision.bf16.value):
        return model({k: v for k, v in batch.items() if k not in ("labels", "groups")})  # + list fields' tensors
