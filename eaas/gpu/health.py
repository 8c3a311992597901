"""HealthMonitor: an actor that samples GPU health through NVML (pynvml, package nvidia-ml-py).

Per GPU it records utilization, memory, temperature, power, ECC error counts and XID /
double-bit-ECC events; `snapshot()` returns the latest sample as plain data for the engine's
snapshot and the admin API. pynvml is imported lazily: on a machine without it, without a
driver or without GPUs the monitor runs and reports `{"available": False, "reason": ...}`.

NVML calls are blocking (the event wait blocks up to its timeout), so every sample runs in a
worker thread (`asyncio.to_thread`); the event loop never waits on the driver.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from eaas.actors import Actor

__all__ = ["HealthMonitor", "HealthConfig", "GpuSampler", "NvmlSampler", "open_nvml"]

GpuSampler = Callable[[float], dict[str, Any]]  # event_wait_s -> {"available", "gpus", ...}


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """interval_s: seconds between samples; event_wait_s: how long one sample waits for XID
    events (in its worker thread); max_events: XID events kept (newest last)."""

    interval_s: float = 1.0
    event_wait_s: float = 0.05
    max_events: int = 64

    def __post_init__(self) -> None:
        for name in ("interval_s", "event_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"HealthConfig.{name}={value!r}: must be a number >= 0")
        if not isinstance(self.max_events, int) or self.max_events < 0:
            raise ValueError(f"HealthConfig.max_events={self.max_events!r}: must be an int >= 0")


class NvmlSampler:
    """Reads every visible GPU through pynvml; built by `open_nvml()`."""

    def __init__(self, nvml: Any, indices: list[int]) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.indices = indices
        self.events = None
        try:
            mask = nvml.nvmlEventTypeXidCriticalError | nvml.nvmlEventTypeDoubleBitEccError
            self.events = nvml.nvmlEventSetCreate()
            for h in self.handles:
                nvml.nvmlDeviceRegisterEvents(h, mask, self.events)
        except Exception:  # events unsupported (e.g. in some containers): sample without them
            self.events = None

    def __call__(self, event_wait_s: float) -> dict[str, Any]:
        n = self.nvml
        gpus = []
        for index, h in zip(self.indices, self.handles):
            gpu: dict[str, Any] = {"index": index}
            for key, read in (
                    ("name", lambda: _text(n.nvmlDeviceGetName(h))),
                    ("uuid", lambda: _text(n.nvmlDeviceGetUUID(h))),
                    ("utilization_gpu_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu),
                    ("utilization_memory_pct",
                     lambda: n.nvmlDeviceGetUtilizationRates(h).memory),
                    ("memory_used_bytes", lambda: n.nvmlDeviceGetMemoryInfo(h).used),
                    ("memory_total_bytes", lambda: n.nvmlDeviceGetMemoryInfo(h).total),
                    ("temperature_c",
                     lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                    ("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0),
                    ("ecc_uncorrected_volatile", lambda: n.nvmlDeviceGetTotalEccErrors(
                        h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)),
                    ("ecc_corrected_volatile", lambda: n.nvmlDeviceGetTotalEccErrors(
                        h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)),
                    ("remapped_rows_pending", lambda: bool(n.nvmlDeviceGetRemappedRows(h)[2]))):
                try:
                    gpu[key] = read()
                except Exception:  # not supported on this GPU/driver: leave it out
                    pass
            gpus.append(gpu)
        events = []
        if self.events is not None and event_wait_s > 0:
            try:
                ev = n.nvmlEventSetWait_v2(self.events, int(event_wait_s * 1000))
                events.append({"event_type": int(ev.eventType), "xid": int(ev.eventData),
                               "uuid": _text(n.nvmlDeviceGetUUID(ev.device))})
            except Exception:  # NVMLError_Timeout: no event in this window
                pass
        return {"available": True, "gpus": gpus, "events": events}

    def close(self) -> None:
        try:
            if self.events is not None:
                self.nvml.nvmlEventSetFree(self.events)
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def open_nvml() -> NvmlSampler | str:
    """An NvmlSampler over every GPU, or a reason string why there is none (never raises)."""
    try:
        import pynvml  # noqa: PLC0415  (optional: nvidia-ml-py)
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return f"NVML unavailable: {exc}"
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            pynvml.nvmlShutdown()
            return "no GPU"
        return NvmlSampler(pynvml, list(range(count)))
    except Exception as exc:
        return f"NVML error: {exc}"


class HealthMonitor(Actor):
    """Samples GPU health every `config.interval_s`; `snapshot()` / ask "snapshot" returns it.

    sampler: a GpuSampler (tests pass a fake); default: `open_nvml()`, degrading to
    {"available": False, "reason": ...} without pynvml, a driver or GPUs.
    Each XID / double-bit ECC event is also passed to `on_event` (e.g. the engine's event bus).
    """

    def __init__(self, config: HealthConfig = HealthConfig(), *,
                 sampler: GpuSampler | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self._sampler = sampler
        self._on_event = on_event
        self._closer: Callable[[], None] | None = None
        self._latest: dict[str, Any] = {"available": False, "reason": "not sampled yet"}
        self._events: list[dict[str, Any]] = []
        self.samples = 0

    async def on_start(self) -> None:
        if self._sampler is None:
            opened = await asyncio.to_thread(open_nvml)
            if isinstance(opened, str):
                self._latest = {"available": False, "reason": opened, "gpus": []}
                return
            self._sampler, self._closer = opened, opened.close
        await self._sample()
        self.context.create_task(self._loop(), name="gpu-health")

    async def _loop(self) -> None:
        while True:
            await self.context.clock.sleep(self.config.interval_s)
            await self._sample()

    async def _sample(self) -> None:
        assert self._sampler is not None
        sample = await asyncio.to_thread(self._sampler, self.config.event_wait_s)
        sample["time"] = time.time()
        for event in sample.pop("events", []):
            event = {**event, "type": "gpu_event", "time": sample["time"]}
            self._events = (self._events + [event])[-self.config.max_events:] \
                if self.config.max_events else []
            if self._on_event is not None:
                self._on_event(event)
        self._latest = sample
        self.samples += 1

    def snapshot(self) -> dict[str, Any]:
        """Latest sample: {"available", "gpus": [{index, name, utilization_gpu_pct, ...}],
        "events": recent XID/ECC events, "time"} or {"available": False, "reason"}."""
        return {**self._latest, "events": list(self._events)}

    async def on_receive(self, msg: Any) -> Any:
        if msg == "snapshot":
            return self.snapshot()
        raise TypeError(f"HealthMonitor understands 'snapshot', got {msg!r}")

    async def on_stop(self) -> None:
        if self._closer is not None:
            await asyncio.to_thread(self._closer)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
