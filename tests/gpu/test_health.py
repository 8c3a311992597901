"""HealthMonitor: samples on a fake clock through a fake sampler; degrades without NVML."""

from __future__ import annotations

import pytest

from eaas.actors import ActorSystem
from eaas.actors.clock import FakeClock
from eaas.gpu import HealthConfig, HealthMonitor, open_nvml


class FakeNvml:
    """Two GPUs; the third sample carries an XID 79 event (GPU fell off the bus)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, event_wait_s: float) -> dict:
        self.calls += 1
        events = [{"event_type": 8, "xid": 79, "uuid": "GPU-1"}] if self.calls == 3 else []
        return {"available": True, "events": events,
                "gpus": [{"index": i, "utilization_gpu_pct": 10 * self.calls,
                          "memory_used_bytes": 1 << 30} for i in range(2)]}


async def test_monitor_samples_every_interval_and_keeps_events() -> None:
    clock = FakeClock()
    seen: list[dict] = []
    sampler = FakeNvml()
    async with ActorSystem(clock=clock) as system:
        ref = await system.spawn(lambda: HealthMonitor(HealthConfig(interval_s=1.0),
                                                       sampler=sampler, on_event=seen.append),
                                 "gpu-health")
        first = await ref.ask("snapshot", timeout=5)
        assert first["available"] and first["gpus"][0]["utilization_gpu_pct"] == 10
        while sampler.calls < 4:
            await clock.advance(1.0)
        snap = await ref.ask("snapshot", timeout=5)
    assert snap["gpus"][1]["utilization_gpu_pct"] >= 30
    assert [e["xid"] for e in snap["events"]] == [79] and seen[0]["type"] == "gpu_event"


async def test_monitor_without_nvml_reports_no_gpu() -> None:
    reason = open_nvml()
    if not isinstance(reason, str):
        reason.close()
        pytest.skip("this machine has working NVML")
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: HealthMonitor(), "gpu-health")
        snap = await ref.ask("snapshot", timeout=5)
    assert snap["available"] is False and snap["reason"] == reason and snap["gpus"] == []


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        HealthConfig(interval_s=-1)
