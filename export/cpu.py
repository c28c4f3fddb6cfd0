"""Which int8 flavour suits the CPU that runs the export (and, by default, will serve the model).

The int8 step (int8.py) always quantizes activations to uint8 (one calibrated scale per tensor); what varies is
the weight type and whether weights use 7 bits ("reduce_range"):

- ``avx512_vnni`` (x86 with AVX512-VNNI or AVX-VNNI): int8 weights, full range. VNNI's u8*s8 dot product
  does not saturate.
- ``avx512`` (AVX-512 without VNNI): int8 weights with reduce_range, because the u8*s8 multiply-add used
  there (vpmaddubsw) can saturate on full-range weights.
- ``avx2``: uint8 weights (u8*u8 kernels), full range, as optimum's avx2 preset does.
- ``arm64``: int8 weights, full range (sdot/udot kernels).
- ``generic``: anything else; uint8 weights, full range.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("avx512_vnni", "avx512", "avx2", "arm64", "generic")


@dataclass(frozen=True)
class QuantTarget:
    name: str
    weight_type: str  # "int8" | "uint8"
    reduce_range: bool


_SETTINGS = {
    "avx512_vnni": QuantTarget("avx512_vnni", "int8", False),
    "avx512": QuantTarget("avx512", "int8", True),
    "avx2": QuantTarget("avx2", "uint8", False),
    "arm64": QuantTarget("arm64", "int8", False),
    "generic": QuantTarget("generic", "uint8", False),
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo (empty where it is not readable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def detect_target(flags: set[str] | None = None, machine: str | None = None) -> str:
    """Name the quantization target for this machine (one of TARGETS)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if {"avx512_vnni", "avx512vnni", "avx_vnni"} & flags:
        return "avx512_vnni"
    if "avx512bw" in flags or "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "generic"


def target_settings(name: str) -> QuantTarget:
    if name not in _SETTINGS:
        raise ValueError(f"quantization target {name!r} not one of {TARGETS}")
    return _SETTINGS[name]
