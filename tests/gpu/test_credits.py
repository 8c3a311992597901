"""Slot/credit bookkeeping of the nvshmem:// mailboxes (the reference the kernels follow), and
the host model of the direct path with timeouts (`ExchangeModel`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.gpu import ChannelLayout, PairState, arrival_target, credit_needed, slot_of
from eaas.gpu.credits import ExchangeModel, exchange_reference


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


def rows_for_each(rnd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-rank put of round `rnd`: one row to each rank d, every element 10 * rnd + d."""
    rows = torch.tensor([[10.0 * rnd + d] * 8 for d in range(2)])
    return rows, torch.tensor([0, 1, 2]), torch.tensor([rnd, rnd])


def test_exchange_model_follows_its_worked_example() -> None:
    model = ExchangeModel.for_layout(ChannelLayout(world_size=2, num_slots=1, max_rows=4,
                                                   hidden=8, dtype="float32"))
    model.round([rows_for_each(0), rows_for_each(0)])
    _, meta = model.round([rows_for_each(1), None], gather=[0])[0]  # rank 1 stopped
    assert meta[:, 0].tolist() == [1, 0] and model.failures(0).tolist() == [[0, 0], [0, 1]]
    _, meta = model.round([rows_for_each(2), None], gather=[0])[0]
    assert meta[:, 0].tolist() == [1, 0] and model.failures(0).tolist() == [[0, 1], [0, 2]]
    out, meta = model.gather(1)  # rank 1 resumes: rank 0's round-1 row (round 2's never went)
    assert meta[0, :2].tolist() == [1, 1] and out[0, 0, 0] == 11 and meta[1, 0] == 0
    assert model.failures(1).tolist() == [[0, 0], [0, 1]]  # (nothing from itself)
    model.clear_failures(0)
    assert not model.failures(0).any()


def test_exchange_reference_of_a_rank_that_put_nothing() -> None:
    out, meta = exchange_reference([rows_for_each(3), None], max_rows=4)[1]
    assert meta[:, 0].tolist() == [1, 0] and out[0, 0, 0] == 31 and not out[1].any()
    with pytest.raises(ValueError, match="no rank put anything"):
        exchange_reference([None, None], max_rows=4)
    rows, _, tags = rows_for_each(0)
    with pytest.raises(ValueError, match="rank 0: offsets must have 3 entries"):
        exchange_reference([(rows, torch.tensor([0, 2]), tags), None], max_rows=4)
