"""The packed row layout (each token once per server) combines to the per-pair reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.engine.row_layout import combine_rows, moe_per_pair_ref, pack_rows, serve_rows_ref

H = 8


def _experts(num_experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_experts, H, H, generator=g, dtype=torch.float64)  # [E, H, H]


def _forward(weights: torch.Tensor):
    def forward(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # [N, H], [N]
        return torch.tanh(torch.einsum("nh,nhg->ng", rows, weights[ids]))

    return forward


def _placement(num_experts: int, num_servers: int, seed: int) -> tuple[torch.Tensor, ...]:
    """expert -> server (random), expert -> local id (its rank among its server's experts),
    and each server's local bank as global ids."""
    g = torch.Generator().manual_seed(seed)
    server = torch.randint(0, num_servers, (num_experts,), generator=g)  # [E]
    local = torch.empty(num_experts, dtype=torch.long)
    banks = []
    for s in range(num_servers):
        hosted = (server == s).nonzero().view(-1)
        local[hosted] = torch.arange(hosted.numel())
        banks.append(hosted)
    return server, local, banks


def _routing(T: int, K: int, E: int, seed: int, absent: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]  # [T, K] distinct experts per token
    if absent:
        ids[torch.rand(T, K, generator=g) < absent] = -1
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    return ids, weights


def _packed_output(x, ids, weights, server, local, banks, experts, S, C):
    layout = pack_rows(ids, weights, server, S, C, expert_local=local)
    y = torch.zeros(S, C, H, dtype=x.dtype)
    for s in range(S):  # each server runs its own local bank on the rows it received
        rows = layout.rows[s]
        if banks[s].numel() == 0:  # a server hosting no expert is sent nothing
            assert (rows == -1).all()
            continue
        x_rows = torch.where(rows[:, None] >= 0, x[rows.clamp(min=0)], 0)  # [C, H]
        y[s] = serve_rows_ref(x_rows, layout.pair_experts[s], layout.pair_weights[s],
                              _forward(experts[banks[s]]))
    return layout, combine_rows(y, layout)


def test_the_worked_example():
    ids = torch.tensor([[0, 2], [1, 0], [3, 2]])
    w = torch.tensor([[.6, .4], [.7, .3], [.5, .5]])
    lay = pack_rows(ids, w, torch.tensor([0, 0, 1, 1]), 2, 2,
                    expert_local=torch.tensor([0, 1, 0, 1]))
    assert lay.rows.tolist() == [[0, 1], [0, 2]]
    assert lay.pair_experts.tolist() == [[[0, -1], [1, 0]], [[0, -1], [1, 0]]]
    torch.testing.assert_close(lay.pair_weights, torch.tensor(
        [[[.6, 0], [.7, .3]], [[.4, 0], [.5, .5]]]))
    assert lay.counts.tolist() == [2, 2] and int(lay.overflow) == 0
    assert lay.token_slots.tolist() == [[0, 2], [1, -1], [3, -1]]
    assert lay.pair_slots.tolist() == [[0, 2], [1, 1], [3, 3]]


@settings(max_examples=60, deadline=None)
@given(T=st.sampled_from([1, 2, 7, 33]), K=st.integers(1, 4), extra=st.integers(0, 8),
       S=st.integers(1, 6), seed=st.integers(0, 2**16), absent=st.sampled_from([0.0, 0.3]))
def test_packed_rows_combine_to_the_per_pair_reference(T, K, extra, S, seed, absent):
    E = K + extra
    experts = _experts(E, seed)
    server, local, banks = _placement(E, S, seed + 1)
    ids, weights = _routing(T, K, E, seed + 2, absent)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    layout, out = _packed_output(x, ids, weights, server, local, banks, experts, S, C=T)
    # float64, so the only difference is the order of the sums
    torch.testing.assert_close(out, moe_per_pair_ref(x, ids, weights, _forward(experts)),
                               rtol=1e-12, atol=1e-12)
    assert int(layout.overflow) == 0
    # each token crosses to each server it needs exactly once
    srv = torch.where(ids >= 0, server[ids.clamp(min=0)], -1)
    for s in range(S):
        needed = sorted({t for t in range(T) if (srv[t] == s).any()})
        got = [t for t in layout.rows[s].tolist() if t >= 0]
        assert got == needed and int(layout.counts[s]) == len(needed)


def test_several_experts_of_a_token_on_one_server_make_one_row():
    experts = _experts(4, 0)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    w = torch.tensor([[.1, .2, .3, .4], [.4, .3, .2, .1]], dtype=torch.float64)
    server = torch.zeros(4, dtype=torch.long)  # one server hosts everything
    x = torch.randn(2, H, dtype=torch.float64)
    layout, out = _packed_output(x, ids, w, server, torch.arange(4), [torch.arange(4)],
                                 experts, 1, 2)
    assert layout.rows.tolist() == [[0, 1]]
    assert layout.pair_experts[0].tolist() == ids.tolist()
    torch.testing.assert_close(out, moe_per_pair_ref(x, ids, w, _forward(experts)),
                               rtol=1e-12, atol=1e-12)


def test_servers_that_receive_nothing_have_empty_rows():
    ids = torch.tensor([[0, 1]] * 5)
    layout = pack_rows(ids, torch.ones(5, 2), torch.tensor([2, 2, 0]), 4, 8)
    assert layout.counts.tolist() == [0, 0, 5, 0]
    assert (layout.rows[[0, 1, 3]] == -1).all() and (layout.pair_experts[[0, 1, 3]] == -1).all()
    assert (layout.pair_weights[[0, 1, 3]] == 0).all()


def test_overflow_is_counted_and_the_rows_that_fit_stay_exact():
    T, K, E, S, C = 33, 2, 6, 3, 5
    experts = _experts(E, 1)
    server, local, banks = _placement(E, S, 2)
    ids, weights = _routing(T, K, E, 3)
    x = torch.randn(T, H, dtype=torch.float64)
    layout, out = _packed_output(x, ids, weights, server, local, banks, experts, S, C)
    srv = server[ids]  # [T, K]
    need = torch.tensor([int((srv == s).any(1).sum()) for s in range(S)])
    assert int(layout.overflow) == int((need - C).clamp(min=0).sum()) > 0
    assert layout.counts.tolist() == need.clamp(max=C).tolist()
    # a token all of whose rows fit is combined exactly; dropped pairs have no slot
    whole = ((layout.pair_slots >= 0) == (ids >= 0)).all(1)  # [T]
    assert whole.any() and not whole.all()
    ref = moe_per_pair_ref(x, ids, weights, _forward(experts))
    torch.testing.assert_close(out[whole], ref[whole], rtol=1e-12, atol=1e-12)


def test_pack_and_combine_keep_fixed_shapes_and_never_sync():
    """Same shapes whatever the routing (a captured graph replays one shape)."""
    shapes = set()
    for seed in range(3):
        ids, w = _routing(7, 2, 5, seed)
        lay = pack_rows(ids, w.float(), torch.tensor([0, 1, 0, 1, 2]), 3, 4)
        y = combine_rows(torch.zeros(3, 4, H), lay)
        shapes.add((tuple(lay.rows.shape), tuple(lay.pair_experts.shape),
                    tuple(lay.token_slots.shape), tuple(lay.overflow.shape), tuple(y.shape)))
    assert shapes == {((3, 4), (3, 4, 2), (7, 2), (), (7, H))}


def test_the_references_take_an_empty_batch():
    """A step with no tokens (an idle shard's round) is legal: both references return [0, H]."""
    f = lambda rows, ids: rows * (ids[:, None] + 1)  # noqa: E731
    none = torch.zeros(0, 2, dtype=torch.long)
    assert moe_per_pair_ref(torch.zeros(0, 8), none, torch.zeros(0, 2), f).shape == (0, 8)
    assert serve_rows_ref(torch.zeros(0, 8), none, torch.zeros(0, 2), f).shape == (0, 8)
