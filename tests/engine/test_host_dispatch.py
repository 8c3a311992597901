"""One dispatcher for every expert-server front end: a protocol dataclass and its wire form get
the same reply from the host, and the front end's policy is applied (and counted) there."""

from __future__ import annotations

import pytest
import torch

from eaas.engine.host_dispatch import HostDispatcher
from eaas.engine.messages import (ComputeBatch, LoadExperts, Ping, SetDelay, Stats,
                                  UnloadExperts)
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.engine.server_policy import RequestGuard


class FakeHost:
    """ExpertHost's surface: y = x * (expert id + 1)."""

    def __init__(self) -> None:
        self.assignment = {0: [0, 1], 2: [5]}
        self.calls = self.rows = 0
        self.load_stats = {"tensors_read": 9}

    def compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += int(x.shape[0])
        return x * (ids[:, None] + 1)

    def add(self, experts: dict) -> None:
        for layer, ids in experts.items():
            self.assignment[layer] = sorted(set(self.assignment.get(layer, [])) | set(ids))

    def remove(self, experts: dict) -> None:
        for layer, ids in experts.items():
            self.assignment[layer] = sorted(set(self.assignment[layer]) - set(ids))


async def inline(fn, *args):
    return fn(*args)


def _dispatch(guard: RequestGuard) -> HostDispatcher:
    return HostDispatcher(FakeHost(), guard, load_in=inline, pid=42,
                          extra_stats=lambda: {"refused_requests": guard.refused})


@pytest.mark.parametrize("wire", [False, True], ids=["in-process", "wire"])
async def test_every_request_reaches_its_host_operation(wire: bool):
    d = _dispatch(RequestGuard(fault_injection=True))

    async def ask(msg):
        return await d.handle(SERVER_PROTOCOL.encode(msg) if wire else msg)

    y = await ask(ComputeBatch(0, torch.ones(3, 2), torch.tensor([0, 1, 0])))
    assert y.tolist() == [[1, 1], [2, 2], [1, 1]]
    assert await ask(Ping()) == {"pid": 42}
    assert await ask(LoadExperts({0: [4]})) == {"0": [0, 1, 4], "2": [5]}
    assert await ask(UnloadExperts({2: [5]})) == {"0": [0, 1, 4], "2": []}
    assert await ask(SetDelay(0.0)) == "ok"
    assert await ask(Stats()) == {"calls": 1, "rows": 3, "experts": {"0": [0, 1, 4], "2": []},
                                  "load_stats": {"tensors_read": 9}, "refused_requests": 0}


async def test_the_policy_is_applied_and_counted_in_the_dispatcher():
    guard = RequestGuard(max_rows=4, fault_injection=False)
    d = _dispatch(guard)
    with pytest.raises(PermissionError, match="fault-injection"):
        await d.handle(SetDelay(1.0))
    with pytest.raises(ValueError, match="5 rows refused: more than max_rows=4"):
        await d.handle(ComputeBatch(0, torch.ones(5, 2), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="compute x has 2 rows but expert_ids 3"):
        await d.handle({"op": "compute", "layer": 0, "x": torch.ones(2, 2),
                        "expert_ids": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="compute expert_ids=.*must be a \\[N\\] integer"):
        await d.handle({"op": "compute", "layer": 0, "x": torch.ones(2, 2),
                        "expert_ids": torch.zeros(2)})
    assert guard.refused == 4 and d.host.calls == 0
    assert d.delay_s == 0.0


async def test_an_in_process_guard_has_no_row_limit_and_allows_fault_injection():
    d = _dispatch(RequestGuard.in_process())
    rows = 70_000  # over the process default of 65536
    y = await d.handle(ComputeBatch(0, torch.ones(rows, 1), torch.zeros(rows, dtype=torch.long)))
    assert y.shape == (rows, 1)
    assert await d.handle(SetDelay(0.5)) == "ok" and d.delay_s == 0.5
