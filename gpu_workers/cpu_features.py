"""What this CPU computes natively, read from the flags in /proc/cpuinfo. torch runs bfloat16 (and float16) on any
x86 CPU, but without the matching instructions it widens operands to float32 and back, which is typically slower
than float32 itself; so the CPU's dtype default follows these flags, not the model's config.json.

Only x86 flags are read: on other CPUs (Arm's bf16 included, which nothing here has measured), on other systems
and when the file cannot be read, the answer is 'not native', so the default falls back to float32, which is
always right, if sometimes slower."""
from __future__ import annotations

import os
from typing import Optional

CPUINFO = "/proc/cpuinfo"

# Instructions that run a dtype's matrix products without widening to float32: AVX512-BF16 (Cooper Lake, Zen 4
# and later) and AMX-BF16 (Sapphire Rapids and later) for bfloat16; AVX512-FP16 (Sapphire Rapids) and AMX-FP16
# (Granite Rapids) for float16. Measured on a 2-core Sapphire Rapids VM serving SmolLM2-135M (16 prompts of 128+128
# tokens): bfloat16 ~260 output tok/s, float16 ~193 (AVX512-FP16, no AMX-FP16), float32 ~173.
NATIVE_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
_NAMES = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16", "avx512_fp16": "AVX512-FP16", "amx_fp16": "AMX-FP16"}


def cpu_flags(path: Optional[str] = None) -> Optional[set[str]]:
    """The first processor's flags; None when the file cannot be read (not Linux, or hidden by a sandbox)."""
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return set(value.split())
    except OSError:
        return None
    return set()  # readable, but no x86 flags line


def native(dtype: str, path: Optional[str] = None) -> tuple[bool, str]:
    """(whether this CPU computes `dtype` natively, why), the reason phrased to follow 'config says X, but ...'."""
    wanted = NATIVE_FLAGS.get(dtype)
    if wanted is None:
        if dtype == "float32":
            return True, "every CPU computes float32"
        return False, f"{dtype} is not a dtype nanoslg runs"
    names = "/".join(_NAMES[f] for f in wanted)
    flags = cpu_flags(path)
    if flags is None:
        return False, f"{path or CPUINFO} is unreadable, so {names} support is unknown"
    found = [f for f in wanted if f in flags]
    if found:
        return True, f"this CPU has {', '.join(_NAMES[f] for f in found)}"
    return False, f"this CPU has no {names}"


def native_bf16(path: Optional[str] = None) -> tuple[bool, str]:
    return native("bfloat16", path)


def usable_cores() -> int:
    """Cores this process may run on: taskset and cpusets leave fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
