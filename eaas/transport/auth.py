"""The cluster secret and the security settings of the engine <-> expert-server transports.

Every stream connection (tcp://, shm://, cudaipc://, nvshmem://) between an engine and its expert
servers starts with a mutual HMAC challenge-response over the cluster secret
(eaas.transport.handshake) before a single frame is read; tcp:// can also run over TLS.

The secret: `EAAS_CLUSTER_SECRET`, a raw string (not decoded: its UTF-8 bytes, surrounding
whitespace stripped, are the HMAC-SHA256 key; at least 16 characters). The engine process
calls `ensure_cluster_secret` at start: `transport.secret_file` if configured, else the variable
if set, else a fresh random one (64 hex characters); it then sets the variable in its own
environment, so every expert-server process it spawns inherits it. A server started elsewhere
(`eaas expert-server --join`) sets the variable from its join response before it listens;
listeners and connectors read it when they are created (`TransportSecurity.from_env`), never at
import.

The other settings (TLS files, the interface to listen on, the server's request policy) travel
from the engine to its server processes as JSON in `EAAS_TRANSPORT` (`export_settings`), read
back with `exported_settings`. These two variables are read here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eaas.errors import AuthError

__all__ = ["SECRET_ENV", "SETTINGS_ENV", "cluster_secret", "ensure_cluster_secret",
           "exported_settings", "export_settings", "TlsFiles", "TransportSecurity"]

log = logging.getLogger("eaas.transport")

SECRET_ENV = "EAAS_CLUSTER_SECRET"
SETTINGS_ENV = "EAAS_TRANSPORT"
MIN_SECRET_CHARS = 16
SETTINGS_KEYS = ("tls_cert", "tls_key", "tls_ca", "listen_host", "max_rows", "fault_injection")


def _key(value: str, source: str) -> bytes:
    value = value.strip()
    if len(value) < MIN_SECRET_CHARS:
        raise AuthError(f"the cluster secret from {source} has {len(value)} characters; at least "
                        f"{MIN_SECRET_CHARS} are needed (e.g. `python -c 'import secrets; "
                        "print(secrets.token_hex(32))'`)")
    return value.encode()


def cluster_secret() -> bytes:
    """The cluster secret from `EAAS_CLUSTER_SECRET` (its UTF-8 bytes, stripped).

    Raises AuthError if it is unset or shorter than 16 characters: a server never listens, and
    an engine never connects, without one.
    """
    value = os.environ.get(SECRET_ENV)
    if not value:
        raise AuthError(f"{SECRET_ENV} is not set: expert servers and the engine authenticate "
                        "every connection with this shared secret (the engine sets it for the "
                        "servers it spawns; a joining server gets it from the engine)")
    return _key(value, SECRET_ENV)


def ensure_cluster_secret(secret_file: str | None = None) -> bytes:
    """The engine process's cluster secret, set in its environment for its children.

    secret_file (config `transport.secret_file`): read the secret from this file (it wins over
    the variable); else `EAAS_CLUSTER_SECRET` if set; else a fresh random secret. Idempotent.
    """
    if secret_file is not None:
        try:
            mode = os.stat(secret_file).st_mode
            with open(secret_file, encoding="utf-8") as f:
                value = f.read()
        except OSError as exc:
            raise AuthError(f"transport.secret_file={secret_file!r} cannot be read: {exc}"
                            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("cluster secret file %s is readable by other users (chmod 600 it)",
                        secret_file)
        key = _key(value, f"transport.secret_file={secret_file!r}")
        os.environ[SECRET_ENV] = key.decode()
        return key
    if not os.environ.get(SECRET_ENV):
        os.environ[SECRET_ENV] = secrets.token_hex(32)
        log.info("generated a cluster secret for this engine's expert servers (set %s or "
                 "transport.secret_file to choose one)", SECRET_ENV)
    return cluster_secret()


def export_settings(settings: Mapping[str, Any]) -> None:
    """Put the transport settings (keys of SETTINGS_KEYS) where spawned servers find them."""
    bad = sorted(set(settings) - set(SETTINGS_KEYS))
    if bad:
        raise ValueError(f"unknown transport setting {bad[0]!r}; allowed: {list(SETTINGS_KEYS)}")
    os.environ[SETTINGS_ENV] = json.dumps(dict(settings), sort_keys=True)


def exported_settings() -> dict[str, Any]:
    """The settings `export_settings` left in `EAAS_TRANSPORT` ({} when unset)."""
    text = os.environ.get(SETTINGS_ENV)
    if not text:
        return {}
    try:
        settings = json.loads(text)
    except ValueError:
        raise ValueError(f"{SETTINGS_ENV} is not JSON: {text[:80]!r}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{SETTINGS_ENV} must be a JSON object, got {text[:80]!r}")
    bad = sorted(set(settings) - set(SETTINGS_KEYS))
    if bad:
        raise ValueError(f"{SETTINGS_ENV} has unknown key {bad[0]!r}; allowed: "
                         f"{list(SETTINGS_KEYS)}")
    return settings


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """TLS for tcp:// (mutual: both ends present `cert` and verify the peer's against `ca`).

    cert, key: PEM files of this process's certificate chain and private key.
    ca:        PEM bundle that signs the peers' certificates; None: `cert` itself (one
               self-signed certificate shared by the cluster).
    Host names are not checked (the cluster's certificate need not name every host; the HMAC
    handshake that follows identifies the peer); the chain is.
    """

    cert: str
    key: str
    ca: str | None = None

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca or self.cert)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load TLS files (cert={self.cert!r}, key={self.key!r}, "
                             f"ca={self.ca!r}): {exc}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        return self._context(ssl.Purpose.SERVER_AUTH)


@dataclass(frozen=True, slots=True)
class TransportSecurity:
    """How one listener or connector authenticates its peers.

    secret: the cluster secret (HMAC-SHA256 key) both ends must hold.
    tls:    TLS files for tcp:// (the unix-socket schemes are same-host and ignore it); None:
            plain TCP (the handshake still authenticates, but the traffic is not encrypted).
    handshake_timeout_s: a peer that has not completed the handshake by then is dropped.
    """

    secret: bytes
    tls: TlsFiles | None = None
    handshake_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_SECRET_CHARS:
            raise ValueError(f"TransportSecurity.secret must be bytes of at least "
                             f"{MIN_SECRET_CHARS} (got {type(self.secret).__name__})")
        if not self.handshake_timeout_s > 0:
            raise ValueError(f"TransportSecurity.handshake_timeout_s="
                             f"{self.handshake_timeout_s!r}: must be > 0")

    def __repr__(self) -> str:  # never print the secret
        return f"TransportSecurity(secret=<{len(self.secret)} bytes>, tls={self.tls!r})"

    @classmethod
    def from_env(cls) -> TransportSecurity:
        """The secret from `EAAS_CLUSTER_SECRET` (AuthError if unset) and the TLS files from
        the exported settings (`EAAS_TRANSPORT`)."""
        settings = exported_settings()
        tls = None
        if settings.get("tls_cert"):
            tls = TlsFiles(settings["tls_cert"], settings["tls_key"], settings.get("tls_ca"))
        return cls(cluster_secret(), tls)
