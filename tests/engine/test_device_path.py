"""The device data path's control side on CPU (eaas.engine.device_path, exchange_host, the
decode lane's replay): path choice, protocol checks, routing around a dropped server, and the
step ledger driving a lane's rollback. The data side runs in tests/kernels (interpreter) and
tests/gpu/test_device_path_cuda.py (the engine's processes on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eaas import EngineConfig
from eaas.engine.decode_lane import AsyncDecode, Launch
from eaas.engine.device_experts import ExpertPlacement
from eaas.engine.device_path import DeviceRouting, device_path_reason
from eaas.engine.exchange_host import ExchangeSets
from eaas.engine.host_dispatch import HostDispatcher
from eaas.engine.messages import ExchangeConnect, ExchangeOpen, ExchangeRun
from eaas.engine.placement import RoutingSnapshot
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.engine.server_policy import RequestGuard
from eaas.engine.step_ledger import MemoryRouting, StepLedger
from eaas.errors import EaasError

TCP = {"expert-0": "tcp://127.0.0.1:1", "expert-1": "tcp://127.0.0.1:2"}


def test_the_path_is_chosen_per_what_the_servers_allow() -> None:
    on = {"expert-0": "cuda:0", "expert-1": "cuda:0"}
    assert device_path_reason("device", "cuda:0", on, TCP) is None
    assert "'host'" in device_path_reason("host", "cuda:0", on, TCP)
    assert "runs on cpu" in device_path_reason("device", "cpu", on, TCP)
    assert "no expert-server" in device_path_reason("device", "cuda:0", {}, TCP)
    assert "expert-1 runs on cpu" in device_path_reason(
        "device", "cuda:0", {**on, "expert-1": "cpu"}, TCP)
    assert "nvshmem://" in device_path_reason(
        "device", "cuda:0", on, {**TCP, "expert-0": "nvshmem://1"})
    # auto: two processes on one GPU time-slice it, the host path is faster there
    assert "shares the shard's GPU" in device_path_reason("auto", "cuda:0", on, TCP)


def test_data_path_config_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"placement.data_path.*one of \('auto', 'host', "
                                         r"'device'\)"):
        EngineConfig.from_dict({"model": "x", "placement": {"data_path": "gpu"}})
    with pytest.raises(ValueError, match="fault.device_timeout_s"):
        EngineConfig.from_dict({"model": "x", "fault": {"device_timeout_s": 0}})


@pytest.mark.parametrize(("tree", "field"), [
    ({"op": "xopen", "set_id": 1, "rank": 0, "format": {}}, "rank"),
    ({"op": "xopen", "set_id": 1, "rank": 1, "format": [1]}, "format"),
    ({"op": "xconnect", "set_id": 1, "exports": [], "layers": [1], "timeout_s": 1.0},
     "exports"),
    ({"op": "xconnect", "set_id": 1, "exports": [None], "layers": [1, 1], "timeout_s": 1.0},
     "layers"),
    ({"op": "xrun", "set_id": 1, "steps": 0}, "steps"),
])
def test_exchange_requests_are_checked_field_by_field(tree, field) -> None:
    with pytest.raises(ValueError, match=field):
        SERVER_PROTOCOL.decode(tree)


async def test_a_server_without_a_device_path_refuses_its_requests_by_name() -> None:
    host = SimpleNamespace(device=torch.device("cpu"), banks={})
    dispatch = HostDispatcher(host, RequestGuard.in_process())
    with pytest.raises(EaasError, match="ExchangeRun: this server has no device data path"):
        await dispatch.handle(ExchangeRun(1, 2))
    sets = ExchangeSets(host, blocking=lambda fn, *a: fn(*a))
    with pytest.raises(EaasError, match="needs a CUDA server; this one runs on cpu"):
        await sets.open(ExchangeOpen(1, 1, {}))
    with pytest.raises(EaasError, match="exchange set 7 is not open here"):
        await sets.connect(ExchangeConnect(7, [None], [1], 1.0))


class _Path:
    """The part of DevicePath that DeviceRouting drives."""

    def __init__(self) -> None:
        self.ranks, self.set_id = {"expert-0": 1, "expert-1": 2}, 9
        self.rows = {"expert-0": {3: {0: 0, 1: 1}}, "expert-1": {3: {0: 0}}}
        self.exchange = SimpleNamespace(peers=torch.tensor([0, 1, 1]))
        self.reroutes = 0

    def reroute(self) -> None:
        self.reroutes += 1


def test_dropping_a_server_routes_around_it_in_a_new_generation() -> None:
    snap = RoutingSnapshot(1, {3: {0: ("expert-0", "expert-1"), 1: ("expert-0",)}})
    path = _Path()
    routing = DeviceRouting(path, snap)
    assert routing.live_replicas((3, 0)) == ("expert-0", "expert-1")
    assert routing.drop("expert-0") == 2
    assert path.exchange.peers.tolist() == [0, 0, 1] and path.reroutes == 1
    assert routing.live_replicas((3, 0)) == ("expert-1",)
    assert routing.live_replicas((3, 1)) == ()  # no live replica in the set: not covered
    assert routing.drop("expert-0") == 2  # already out: same generation
    assert routing.experts_of("expert-0") == [(3, 0), (3, 1)]
    # a newer table (the killed process restarted) does not bring it back into this set
    routing.update(RoutingSnapshot(2, snap.table))
    assert routing.live_replicas((3, 0)) == ("expert-1",) and path.reroutes == 2


def test_an_expert_placement_update_is_in_place() -> None:
    place = ExpertPlacement.build(4, {0: (1, 0), 2: (0, 5)})
    server = place.server
    place.update(ExpertPlacement.build(4, {0: (0, 3)}))
    assert place.server is server and place.server.tolist() == [0, -1, -1, -1]
    assert place.local.tolist() == [3, 0, 0, 0]


class _Lane(AsyncDecode):
    """AsyncDecode's ledger side over fakes: steps 'run' by bumping num_computed."""

    def __init__(self) -> None:
        self.device_path = SimpleNamespace(
            exchange=object(), announced=0, flagged=lambda flags: frozenset(
                n for n, r in (("expert-0", 1), ("expert-1", 2)) if flags[r]))
        self.device_path.announce = lambda k: setattr(self.device_path, "announced",
                                                      self.device_path.announced + k)
        self.forgotten: list = []
        self.graphs = SimpleNamespace(experts=self.device_path.exchange, slots=SimpleNamespace(
            forget=self.forgotten.append))
        self.ledger = StepLedger(MemoryRouting({(3, 0): ("expert-0", "expert-1")}))
        self._ahead, self._retry = [None], [None]
        self.events: list[dict] = []
        self.deps = SimpleNamespace(emit=self.events.append)
        self.name, self.steps = "shard-0", 0
        self.finished: list[tuple] = []

    def _finish(self, r, reason, error=None) -> None:
        self.finished.append((r, reason, error))

    def launch(self, reqs) -> Launch:
        ticket = self._ticket(0, reqs)
        for r in reqs:
            r.num_computed += 1
        return Launch([(r, i) for i, r in enumerate(reqs)], out=None, ticket=ticket)


def test_a_flagged_step_rolls_the_lane_back_and_its_retry_is_the_next_launch() -> None:
    lane = _Lane()
    a, b = SimpleNamespace(num_computed=10), SimpleNamespace(num_computed=20)
    first = lane.launch([a, b])
    lane._ahead[0] = second = lane.launch([a, b])  # fed first's tokens on the device
    assert (a.num_computed, b.num_computed) == (12, 22)
    assert lane.device_path.announced == 2
    assert lane._commits(first, [0, 3, 0], 0) is False  # expert-0 timed out
    assert (a.num_computed, b.num_computed) == (10, 20)  # as before the failed step
    assert {id(r) for r in lane.forgotten} == {id(a), id(b)}  # slots refilled from the host
    assert lane._ahead[0] is None  # the step that fed its tokens is void
    retry = lane._retry[0]
    assert retry is not None and retry.step == first.ticket.step and retry.attempt == 1
    assert lane.events[-1]["type"] == "step_replay" and lane.events[-1]["servers"] == \
        ["expert-0"]
    again = lane.launch([a, b])  # the lane's next launch is the retry (no fresh ticket)
    assert again.ticket is retry and lane._retry[0] is None
    assert lane._commits(again, [0, 0, 0], 0) is True
    assert lane.ledger.land(second.ticket).verdict.value == "stale"
    assert lane.device_path.announced == 3  # every launch, the replay too, is a server step


def test_the_livelock_guard_fails_the_steps_requests() -> None:
    lane = _Lane()
    lane.ledger = StepLedger(MemoryRouting({(3, 0): ("expert-0",)}), max_replays=0)
    a = SimpleNamespace(num_computed=5)
    step = lane.launch([a])
    assert lane._commits(step, [0, 0, 1], 0) is False
    assert [(r, why) for r, why, _ in lane.finished] == [(a, "error")]
    assert "failed 1 attempts" in lane.finished[0][2]
    assert lane.events[-1]["type"] == "step_failed"


def test_only_a_rise_in_a_servers_trouble_flags_it() -> None:
    """A readmission resets the rank's failure words: the next step's delta is negative there,
    which is not a failure of that step."""
    from eaas.engine.device_path import DevicePath

    path = SimpleNamespace(ranks={"expert-0": 1, "expert-1": 2})
    assert DevicePath.flagged(path, [0, -1, 2]) == frozenset({"expert-1"})
    assert DevicePath.flagged(path, [0, 0, 0]) == frozenset()


def test_servers_added_while_serving_are_joinable_once_they_host_experts() -> None:
    from eaas.engine.device_path import DevicePath

    table = {3: {0: ("expert-0", "expert-2"), 1: ("expert-0",)}}
    path = _Path()
    path.readmitting = set()
    path.routing = DeviceRouting(path, RoutingSnapshot(2, table))
    urls = {"expert-0": "tcp://a", "expert-1": "tcp://b", "expert-2": "tcp://c",
            "expert-3": ""}
    devices = dict.fromkeys(urls, "cuda:0")
    assert DevicePath.joinable(path, urls, devices, "device", "cuda:0") == ["expert-2"]
    # not listening yet (""), hosting nothing (expert-3), on a device the path refuses
    assert DevicePath.joinable(path, urls, {**devices, "expert-2": "cpu"}, "device",
                               "cuda:0") == []
    assert DevicePath.joinable(path, urls, devices, "auto", "cuda:0") == []  # same GPU: host
    path.ranks["expert-2"], path.rows["expert-2"] = 3, {3: {0: 0}}
    assert DevicePath.joinable(path, urls, devices, "device", "cuda:0") == []
    assert path.routing.joined("expert-2") == 2 and path.reroutes == 1
    assert path.routing.live_replicas((3, 0)) == ("expert-0", "expert-2")
