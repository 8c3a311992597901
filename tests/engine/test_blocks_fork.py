"""BlockAllocator.fork: sequences of one request share the prompt's full blocks (counted), each
gets blocks of its own for the rest, and every block comes back once its last table goes."""

from __future__ import annotations

import pytest

from eaas.engine.blocks import BlockAllocator
from eaas.errors import RequestError


def test_fork_shares_full_blocks_and_frees_them_last():
    a = BlockAllocator(8, 4)
    parent = a.allocate("p", 12)  # (0, 1, 2): a 9-token prompt + 3 new tokens
    c1, c2 = a.fork("p", ["c1", "c2"], 12, num_shared=2)
    assert parent.block_ids == (0, 1, 2)
    assert c1.block_ids == (0, 1, 3) and c2.block_ids == (0, 1, 4)
    assert a.num_used == 5
    a.free("p")
    assert a.num_used == 4  # only the parent's own block 2 came back
    a.free("c1")
    assert a.num_used == 3
    a.free("c2")
    assert a.num_used == 0 and a.allocate("x", 32).block_ids == tuple(range(8))


def test_fork_is_all_or_nothing():
    a = BlockAllocator(4, 4)
    a.allocate("p", 8)  # (0, 1)
    assert a.fork("p", ["c1", "c2", "c3"], 8, num_shared=1) is None  # needs 3, 2 free
    assert a.num_used == 2 and "c1" not in a
    with pytest.raises(ValueError, match="num_shared"):
        a.fork("p", ["c"], 8, num_shared=3)


def test_check_fits_counts_the_forks():
    a = BlockAllocator(6, 4)
    a.check_fits(12, forks=3, num_shared=2)  # 3 + 3 * 1 = 6 blocks
    with pytest.raises(RequestError, match="7 blocks"):
        a.check_fits(12, forks=4, num_shared=2)
