"""The torch.distributed store that an NVSHMEM fabric rendezvouses through at start-up.

`join_fabric` (eaas.transport.fabric) initialises torch.distributed (NCCL), and NVSHMEM
bootstraps from it, over a TCPStore that rank 0 hosts at `host:port`. Two things torch does not
do, done here:

- Bind the interface named. torch's TCPStore server listens on every interface (`*:port`)
  whatever host it is given; `rendezvous_store` binds the listening socket to exactly `host`
  itself (the engine passes `transport.listen_host`, loopback by default) and hands torch the
  socket (`master_listen_fd`).
- Keep the keys unguessable. TCPStore has no authentication (torch offers none: any process
  that reaches the port may get, set, list and delete keys). Every key of the job goes under a
  prefix derived from the cluster secret and the store's address, so a process without the
  secret cannot plant the job's keys ahead of the ranks (e.g. a forged NCCL unique id) by
  guessing their names. This is not authentication: a peer that reaches the port can still
  `list_keys` once the ranks have written theirs; only the bind keeps it from being reached.
  The README's security section says so.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import socket
from typing import Any

__all__ = ["rendezvous_store", "store_prefix"]

log = logging.getLogger("eaas.transport")


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rendezvous address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def store_prefix(address: str) -> str:
    """The job's key prefix: 32 hex digits of HMAC-SHA256(cluster secret, address); without a
    secret (EAAS_CLUSTER_SECRET unset: a test or a hand-made job) a fixed, guessable one."""
    from eaas.errors import AuthError
    from eaas.transport.auth import cluster_secret

    try:
        secret = cluster_secret()
    except AuthError:
        log.warning("no cluster secret: the rendezvous store at %s uses a guessable key prefix",
                    address)
        return "eaas/nosecret"
    digest = hmac.new(secret, b"eaas/store\0" + address.encode(), hashlib.sha256).hexdigest()
    return f"eaas/{digest[:32]}"


def rendezvous_store(address: str, rank: int, world_size: int, timeout_s: float) -> Any:
    """The store of the job at `address` ("host:port") as rank `rank` sees it.

    Rank 0 hosts it, listening on exactly `host`; every other rank connects. Returns a
    torch.distributed PrefixStore over the TCPStore (pass it as `init_process_group(store=)`).
    """
    import torch.distributed as dist

    host, port = _split(address)
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=max(128, world_size))
        except OSError as exc:
            raise OSError(f"cannot host the rendezvous store on {address}: {exc}") from exc
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, is_master=True,
                              timeout=timeout, wait_for_workers=False,
                              master_listen_fd=sock.detach())  # the store owns the socket now
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(store_prefix(address), store)
