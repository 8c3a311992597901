"""The expert-server protocol: the requests every expert server answers, declared once.

    request (eaas.engine.messages)            tag       reply
    ComputeBatch(layer, x, expert_ids)        compute   y [N, H], row n through expert_ids[n]
    Ping()                                    ping      {"pid": int} (a process; {} in-process)
    Stats()                                   stats     {"calls", "rows", "experts", "load_stats"}
                                                        (+ "pid", "security" from a process)
    LoadExperts({layer: [ids]})               load      {"layer": [ids]}: what it hosts now
    UnloadExperts({layer: [ids]})             unload    likewise
    SetDelay(seconds)                         delay     "ok" (fault injection only)

In-process servers receive the dataclasses themselves; a server process receives
`SERVER_PROTOCOL.encode(msg)` ({"op": tag, ...fields}, framed by the transport codec) and
decodes it with every field checked. Either way one `HostDispatcher`
(eaas.engine.host_dispatch) runs it, after the front end's `RequestGuard`
(eaas.engine.server_policy). Maps in replies have string keys (as JSON has them).

    tree = SERVER_PROTOCOL.encode(ComputeBatch(0, x, ids))   # what ServerProcess sends
    msg = SERVER_PROTOCOL.decode(tree)                       # ValueError names a bad field
"""

from __future__ import annotations

from eaas.engine.messages import (ComputeBatch, LoadExperts, Ping, SetDelay, Stats,
                                  UnloadExperts)
from eaas.transport.wire import INT, MessageType, MessageTypes, int_lists_by_int, number, tensor

__all__ = ["SERVER_PROTOCOL", "experts_reply"]


def _rows_match(msg: ComputeBatch) -> None:
    rows, ids = int(msg.x.shape[0]), int(msg.expert_ids.shape[0])
    if rows != ids:
        raise ValueError(f"compute x has {rows} rows but expert_ids {ids}")


SERVER_PROTOCOL = MessageTypes([
    MessageType("compute", ComputeBatch, {"layer": INT, "x": tensor(2, shape="[N, H]"),
                                          "expert_ids": tensor(1, "int", shape="[N]")},
                check=_rows_match),
    MessageType("ping", Ping),
    MessageType("stats", Stats),
    MessageType("load", LoadExperts, {"experts": int_lists_by_int()}),
    MessageType("unload", UnloadExperts, {"experts": int_lists_by_int()}),
    MessageType("delay", SetDelay, {"seconds": number(lo=0.0)}),
], noun="request")


def experts_reply(assignment: dict[int, list[int]]) -> dict[str, list[int]]:
    """{layer: ids} as a reply carries it: string keys, sorted ids."""
    return {str(k): sorted(v) for k, v in assignment.items()}
