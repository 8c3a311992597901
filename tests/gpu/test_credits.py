"""Slot/credit bookkeeping of the nvshmem:// mailboxes (the reference the kernels follow)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.gpu import ChannelLayout, PairState, arrival_target, credit_needed, slot_of


def test_worked_example_from_the_module_docstring() -> None:
    pair = PairState(num_slots=2, ctas_per_send=4)
    assert pair.send("m0") == 0 and pair.sig == 4
    assert pair.send("m1") == 1 and pair.sig == 8
    assert not pair.can_send()  # message 2 needs slot 0 back: credit 1
    assert credit_needed(2, 2) == 1 and pair.credit == 0
    assert pair.can_recv() and arrival_target(0, 4) == 4
    assert pair.recv() == "m0" and pair.credit == 1
    assert pair.can_send() and pair.send("m2") == 0 and pair.sig == 12
    assert [pair.recv(), pair.recv()] == ["m1", "m2"]
    assert not pair.can_recv()


def test_sending_without_credit_is_refused() -> None:
    pair = PairState(num_slots=1)
    pair.send(0)
    with pytest.raises(RuntimeError, match="before credit"):
        pair.send(1)
    with pytest.raises(RuntimeError, match="before it arrived"):
        PairState(num_slots=3).recv()


@settings(max_examples=200, deadline=None)
@given(num_slots=st.integers(1, 5), ctas=st.integers(1, 8),
       steps=st.lists(st.booleans(), min_size=1, max_size=80))
def test_any_interleaving_delivers_every_message_once_in_order(num_slots, ctas, steps) -> None:
    """The sender sends whenever credit allows, the receiver receives whenever a message
    arrived, in any order: no slot is overwritten (PairState asserts it), nothing is lost."""
    pair = PairState(num_slots=num_slots, ctas_per_send=ctas)
    got: list[int] = []
    for want_send in steps + [False] * (num_slots + 1):
        if want_send and pair.can_send():
            pair.send(pair.sent)
        elif pair.can_recv():
            got.append(pair.recv())  # type: ignore[arg-type]
        assert pair.sent - pair.recvd <= num_slots
    assert got == list(range(pair.sent))


def test_slot_arithmetic() -> None:
    assert [slot_of(s, 3) for s in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [credit_needed(s, 3) for s in range(5)] == [-2, -1, 0, 1, 2]
    assert arrival_target(2, 16) == 48


def test_layout_shapes_and_bytes() -> None:
    lay = ChannelLayout(world_size=2, num_slots=2, max_rows=1024, hidden=7168)
    assert lay.recv_shape == (2, 2, 1024, 7168) and lay.meta_shape == (2, 2, 1025)
    assert lay.symmetric_bytes == 2 * 2 * 1024 * 7168 * 2 + 2 * 2 * 1025 * 8 + 32


@pytest.mark.parametrize("field,value", [("world_size", 0), ("num_slots", -1), ("hidden", 1.5),
                                         ("dtype", "int8"), ("max_rows", 1 << 20)])
def test_layout_rejects_bad_fields_by_name(field: str, value: object) -> None:
    kwargs = dict(world_size=2, num_slots=2, max_rows=8, hidden=4096)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field if field != "max_rows" else "max_rows"):
        ChannelLayout(**kwargs)  # type: ignore[arg-type]
