"""What this CPU can do, read from its flags (``/proc/cpuinfo`` on Linux; none elsewhere).

The runtime, the INT8 layout and bf16 training are chosen from these flags, and the
machines Tandem runs on change under it (AVX2 alone, AVX-512 VNNI, AMX), so every choice
reads them here rather than assuming the CPU it was measured on.
"""

from __future__ import annotations

import platform
from pathlib import Path

# Instructions that multiply u8 by s8 and accumulate in 32 bits in one step: static INT8
# graphs (OpenVINO) are fast only with one of them (benchmarks/RESULTS.md, "CPU runtimes").
INT8_DOT_PRODUCT = frozenset({"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})
BF16_MATMUL = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first processor's flags (``Features`` on Arm); empty where they cannot be read."""
    fields = _first_processor(cpuinfo)
    return frozenset(fields.get("flags", fields.get("Features", "")).split())


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def has_int8_dot_product(flags: frozenset[str]) -> bool:
    return bool(flags & INT8_DOT_PRODUCT)


def has_bf16_matmul(flags: frozenset[str]) -> bool:
    return bool(flags & BF16_MATMUL)


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The first processor's ``model name`` (``lscpu``'s Model name); "" where unknown."""
    return _first_processor(cpuinfo).get("model name", "")


def cpu_identity(cpuinfo: str | None = None) -> str:
    """Vendor, family, model and stepping, e.g. ``AuthenticAMD 26 2 0``; "" where unknown.

    Cloud machines often mask the model name (every EPYC here reads ``AMD EPYC``), and two
    generations can report the same flags, so what was measured on one CPU is keyed by these.
    """
    fields = _first_processor(cpuinfo)
    parts = [fields.get(name, "") for name in ("vendor_id", "cpu family", "model", "stepping")]
    return " ".join(parts).strip()


def _first_processor(cpuinfo: str | None) -> dict[str, str]:
    """The fields of ``/proc/cpuinfo``'s first block (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), value.strip())
    return fields
