"""NVML sampling for the GPU panel (nvidia-ml-py, module `pynvml`). No Textual here.

`sample()` never raises: without a driver, library or GPU it answers `GpuReport(gpus=[], error=...)`.
`NYX_GPU=none` forces that answer (tests, CPU boxes). NVML is initialised once per process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    util_pct: int | None = None
    mem_used_mb: int | None = None
    mem_total_mb: int | None = None
    temp_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


@dataclass(frozen=True)
class GpuReport:
    gpus: list[GpuInfo] = field(default_factory=list)
    error: str | None = None


_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised
_init_error: str | None = None
_initialised = False


def _init() -> tuple[Any, str | None]:
    global _nvml, _init_error, _initialised
    with _lock:
        if not _initialised:
            _initialised = True
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml = pynvml
            except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, mismatch, ImportError
                _init_error = f"no NVIDIA GPU ({_describe(exc)})"
        return _nvml, _init_error


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).strip()
    if name.startswith("NVMLError_"):
        name = name[len("NVMLError_") :]
    return f"{name}: {text}" if text and text not in name else name


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _one(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))

    def attempt(fn: Any) -> Any:
        try:
            return fn()
        except Exception:  # a field this GPU or driver does not support
            return None

    util = attempt(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    mem = attempt(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    temp = attempt(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    power = attempt(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    limit = attempt(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    return GpuInfo(
        index=index,
        name=name,
        util_pct=int(util) if util is not None else None,
        mem_used_mb=int(mem.used // 2**20) if mem is not None else None,
        mem_total_mb=int(mem.total // 2**20) if mem is not None else None,
        temp_c=int(temp) if temp is not None else None,
        power_w=power / 1000.0 if power is not None else None,
        power_limit_w=limit / 1000.0 if limit is not None else None,
    )


def sample() -> GpuReport:
    """One reading of every GPU. Never raises."""
    if os.environ.get("NYX_GPU", "").lower() == "none":
        return GpuReport(error="no NVIDIA GPU (NYX_GPU=none)")
    nvml, error = _init()
    if nvml is None:
        return GpuReport(error=error or "no NVIDIA GPU")
    try:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return GpuReport(error="no NVIDIA GPU (the driver reports none)")
        return GpuReport(gpus=[_one(nvml, i) for i in range(count)])
    except Exception as exc:
        return GpuReport(error=f"no NVIDIA GPU ({_describe(exc)})")
