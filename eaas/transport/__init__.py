"""Transports chosen by URL scheme behind one Connection/Listener protocol.

    listener = await listen("tcp://127.0.0.1:0", handler)   # or inproc://name, shm://
    conn = await connect(listener.url)
    await conn.send({"rows": x, "expert_ids": ids})         # nested values + torch.Tensor leaves
    msg = await conn.recv(timeout=5.0)
    reply = await RpcClient(conn).call(msg, timeout=1.0)    # request/response on a connection
    tree = types.encode(ComputeBatch(...))                  # typed messages: MessageTypes

Between processes, pass `security=TransportSecurity.from_env()` to both `listen` and `connect`:
every connection then starts with a mutual HMAC handshake over the cluster secret
(`EAAS_CLUSTER_SECRET`; eaas.transport.auth), and tcp:// can run over TLS.
"""

from __future__ import annotations

from eaas.transport.auth import TlsFiles, TransportSecurity, cluster_secret, ensure_cluster_secret
from eaas.transport.base import Connection, Lease, Listener, SendHandle
from eaas.transport.codec import DTYPES, decode_message, encode_message
from eaas.transport.limits import TransportLimits
from eaas.transport.registry import SCHEMES, connect, listen
from eaas.transport.remote import RemoteActorRef, remote_ref, serve_actors
from eaas.transport.rpc import RpcClient, serve_rpc
from eaas.transport.wire import Field, MessageType, MessageTypes

__all__ = [
    "Connection", "Listener", "SendHandle", "Lease", "TransportLimits", "connect", "listen",
    "SCHEMES", "DTYPES", "encode_message", "decode_message", "RpcClient", "serve_rpc",
    "serve_actors", "remote_ref", "RemoteActorRef", "TransportSecurity", "TlsFiles",
    "cluster_secret", "ensure_cluster_secret", "MessageTypes", "MessageType", "Field",
]
