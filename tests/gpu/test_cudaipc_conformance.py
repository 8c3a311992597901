"""The transport conformance suite over cudaipc:// (CPU tensors travel inline as on tcp://).

The suite's own tests are re-run here with `scheme` pinned to cudaipc and the suite's URL table
extended for the duration of each test; CUDA tensors are covered in test_cudaipc_cuda.py.
"""

from __future__ import annotations

import pytest

from tests.transport import conftest as transport_conftest
from tests.transport import test_conformance as suite
from tests.transport.conftest import echo_listener, outcomes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _cudaipc_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(transport_conftest.LISTEN_URLS, "cudaipc", "cudaipc://")


@pytest.fixture
def scheme() -> str:
    return "cudaipc"


@pytest.fixture
async def rpc_listener(scheme: str):
    from eaas.transport import listen, serve_rpc

    listener = await listen("cudaipc://", lambda conn: serve_rpc(conn, suite.rpc_handler))
    yield listener
    await listener.aclose()


_NAMES = [n for n in dir(suite) if n.startswith("test_")]
for _name in _NAMES:
    globals()[_name] = getattr(suite, _name)


def test_every_conformance_test_is_collected_here() -> None:
    assert len(_NAMES) >= 14, _NAMES
