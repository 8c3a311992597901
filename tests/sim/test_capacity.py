"""Capacity simulator: a hand-computed case, monotonicity in load, EaaS <= EP, placements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.sim import (CapacitySimulator, ServerModel, eaas_placement, ep_max_share,
                      expert_shares, zipf_trace)
from eaas.sim.placement import wrap_placement

TINY = np.array([0.4, 0.3, 0.2, 0.1])  # 4 experts; 2 slots per GPU; 1 assignment/s per GPU


def test_tiny_case_ep_by_hand() -> None:
    assert ep_max_share(TINY, 1, 2) == float("inf")  # 4 experts do not fit on one GPU
    assert ep_max_share(TINY, 2, 2) == pytest.approx(0.7)  # {e0, e1} | {e2, e3}
    assert ep_max_share(TINY, 4, 2) == pytest.approx(0.4)
    assert ep_max_share(TINY, 8, 2) == pytest.approx(0.2)  # two copies of the 4-GPU layout


def test_tiny_case_placements_by_hand() -> None:
    two = eaas_placement(TINY, 2, 2)
    assert two is not None and two.servers == ((0, 3), (1, 2))
    assert two.loads == pytest.approx((0.5, 0.5))
    three = eaas_placement(TINY, 3, 2)
    assert three is not None and three.replicas == (2, 2, 1, 1)
    assert three.servers == ((0, 1), (0, 1), (2, 3))
    assert three.loads == pytest.approx((0.35, 0.35, 0.3))
    four = wrap_placement(TINY, 4, 2)
    assert four is not None and four.servers == ((0,), (0, 3), (1,), (1, 2))  # e0, e3, e1, e2
    assert four.loads == pytest.approx((0.25,) * 4)
    assert wrap_placement(TINY, 3, 2) is None  # the third server would need 3 slots


@pytest.mark.parametrize(("load", "ep", "eaas"), [
    (1.0, 2, 2),   # EP 0.7 <= 1
    (2.0, 4, 2),   # EP 2 GPUs: 1.4 > 1; EaaS {e0,e3}|{e1,e2}: 1.0
    (2.5, 4, 3),   # EP 4 GPUs: 0.4 * 2.5 = 1.0; EaaS 3 servers: 0.35 * 2.5 = 0.875
    (3.5, 8, 4),   # EP 4 GPUs: 1.4 > 1; EaaS wrap-around on 4: 0.25 * 3.5 = 0.875
])
def test_tiny_case_gpus_by_hand(load: float, ep: int, eaas: int) -> None:
    sim = CapacitySimulator(TINY, ServerModel(tokens_per_s=1.0, expert_slots=2))
    assert (sim.ep_gpus(load), sim.eaas_gpus(load)) == (ep, eaas)


@pytest.fixture(scope="module", params=[(0.0, 0), (0.3, 1), (0.8, 2)], ids=str)
def sim(request: pytest.FixtureRequest) -> CapacitySimulator:
    exponent, seed = request.param
    shares = expert_shares(zipf_trace(64, num_windows=8, exponent=exponent, seed=seed))
    return CapacitySimulator(shares, ServerModel(tokens_per_s=1.0, expert_slots=8))


LOADS = np.linspace(0.0, 24.0, 49)


def test_monotone_in_load(sim: CapacitySimulator) -> None:
    points = sim.curve(LOADS)
    ep = [p.ep_gpus for p in points]
    eaas = [p.eaas_gpus for p in points]
    assert ep == sorted(ep) and eaas == sorted(eaas)
    assert eaas[-1] > eaas[0]  # the grid reaches past the memory bound


def test_eaas_never_needs_more_than_ep(sim: CapacitySimulator) -> None:
    for p in sim.curve(LOADS):
        assert p.eaas_gpus <= p.ep_gpus, p
        assert p.eaas_gpus >= max(sim.min_gpus, p.load / sim.model.capacity)  # lower bounds


def test_placement_respects_slots_and_hosts_every_expert() -> None:
    shares = expert_shares(zipf_trace(64, num_windows=4, exponent=0.8, seed=3))
    for placer in (eaas_placement, wrap_placement):
        placed = placer(shares, 16, 8)
        assert placed is not None
        assert all(len(s) <= 8 and len(set(s)) == len(s) for s in placed.servers)
        counts = np.bincount([e for s in placed.servers for e in s], minlength=64)
        assert (counts == np.array(placed.replicas)).all() and (counts >= 1).all()
        assert sum(placed.loads) == pytest.approx(1.0)


def test_trace_is_seeded_and_skewed() -> None:
    a = zipf_trace(32, num_windows=4, exponent=1.0, seed=7)
    assert a.shape == (4, 32) and (a == zipf_trace(32, num_windows=4, exponent=1.0, seed=7)).all()
    shares = expert_shares(a)
    assert shares.sum() == pytest.approx(1.0)
    assert shares.max() > 5 * shares.min()
    flat = expert_shares(zipf_trace(32, num_windows=4, exponent=0.0, seed=7))
    assert flat.max() < 1.5 * flat.min()


def test_server_model_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="expert_slots"):
        ServerModel(expert_slots=0)
    with pytest.raises(ValueError, match="max_util"):
        ServerModel(max_util=1.5)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=24),
       slots=st.integers(1, 6), loads=st.lists(st.floats(0.0, 12.0), min_size=2, max_size=6))
def test_monotone_and_no_worse_than_ep_on_random_shares(weights: list[float], slots: int,
                                                        loads: list[float]) -> None:
    shares = np.array(weights) / sum(weights)
    sim = CapacitySimulator(shares, ServerModel(tokens_per_s=1.0, expert_slots=slots))
    points = sim.curve(sorted(loads))
    assert [p.ep_gpus for p in points] == sorted(p.ep_gpus for p in points)
    assert [p.eaas_gpus for p in points] == sorted(p.eaas_gpus for p in points)
    assert all(p.eaas_gpus <= p.ep_gpus for p in points)
