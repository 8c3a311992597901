"""The expert-server protocol: the requests every expert server answers, declared once.

    request (eaas.engine.messages)            tag       reply
    ComputeBatch(layer, x, expert_ids)        compute   y [N, H], row n through expert_ids[n]
    Ping()                                    ping      {"pid": int} (a process; {} in-process)
    Stats()                                   stats     {"calls", "rows", "experts", "load_stats"}
                                                        (+ "pid", "security" from a process)
    LoadExperts({layer: [ids]})               load      {"layer": [ids]}: what it hosts now
    UnloadExperts({layer: [ids]})             unload    likewise
    SetDelay(seconds)                         delay     "ok" (fault injection only)
    ExchangeOpen(set_id, rank, format)        xopen     {"export", "experts", "rows"}  (device
    ExchangeConnect(set_id, exports, layers,  xconnect  "ok", once warmed up           data path,
                    timeout_s[, alone])                                                a CUDA
    ExchangeRun(set_id, steps)                xrun      "ok"                           server
    ExchangeClose(set_id)                     xclose    "ok"                           process)

In-process servers receive the dataclasses themselves; a server process receives
`SERVER_PROTOCOL.encode(msg)` ({"op": tag, ...fields}, framed by the transport codec) and
decodes it with every field checked. Either way one `HostDispatcher`
(eaas.engine.host_dispatch) runs it, after the front end's `RequestGuard`
(eaas.engine.server_policy). Maps in replies have string keys (as JSON has them).

    tree = SERVER_PROTOCOL.encode(ComputeBatch(0, x, ids))   # what ServerProcess sends
    msg = SERVER_PROTOCOL.decode(tree)                       # ValueError names a bad field
"""

from __future__ import annotations

from typing import Any

from eaas.engine.messages import (ComputeBatch, ExchangeClose, ExchangeConnect, ExchangeOpen,
                                  ExchangeRun, LoadExperts, Ping, SetDelay, Stats, UnloadExperts)
from eaas.transport.wire import (BOOL, INT, Field, MessageType, MessageTypes, int_lists_by_int,
                                 number, tensor)

__all__ = ["SERVER_PROTOCOL", "experts_reply"]


def _rows_match(msg: ComputeBatch) -> None:
    rows, ids = int(msg.x.shape[0]), int(msg.expert_ids.shape[0])
    if rows != ids:
        raise ValueError(f"compute x has {rows} rows but expert_ids {ids}")


def _map(value: Any) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError
    return value


def _exports(value: Any) -> list:
    if not isinstance(value, (list, tuple)) or not value \
            or not all(v is None or isinstance(v, dict) for v in value):
        raise ValueError
    return list(value)


def _layers(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) \
            or len(set(value)) != len(value):
        raise ValueError
    return list(value)


def _positive(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError
    return value


MAP = Field("a map with string keys", _map)
EXPORTS = Field("a non-empty list of exports (maps) or nulls", _exports)
LAYERS = Field("a non-empty list of distinct layer ids >= 0", _layers)
POSITIVE = Field("an int >= 1", _positive)

SERVER_PROTOCOL = MessageTypes([
    MessageType("compute", ComputeBatch, {"layer": INT, "x": tensor(2, shape="[N, H]"),
                                          "expert_ids": tensor(1, "int", shape="[N]")},
                check=_rows_match),
    MessageType("ping", Ping),
    MessageType("stats", Stats),
    MessageType("load", LoadExperts, {"experts": int_lists_by_int()}),
    MessageType("unload", UnloadExperts, {"experts": int_lists_by_int()}),
    MessageType("delay", SetDelay, {"seconds": number(lo=0.0)}),
    MessageType("xopen", ExchangeOpen, {"set_id": INT, "rank": POSITIVE, "format": MAP}),
    MessageType("xconnect", ExchangeConnect, {"set_id": INT, "exports": EXPORTS,
                                              "layers": LAYERS,
                                              "timeout_s": number(lo=1e-3, hi=3600.0),
                                              "alone": BOOL}),
    MessageType("xrun", ExchangeRun, {"set_id": INT, "steps": POSITIVE}),
    MessageType("xclose", ExchangeClose, {"set_id": INT}),
], noun="request")


def experts_reply(assignment: dict[int, list[int]]) -> dict[str, list[int]]:
    """{layer: ids} as a reply carries it: string keys, sorted ids."""
    return {str(k): sorted(v) for k, v in assignment.items()}
