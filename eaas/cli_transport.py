"""The transport-security flags of the `eaas` commands (config section `transport`).

    eaas serve MODEL [--cluster-secret-file PATH] [--transport-listen-host HOST]
                     [--tls-cert PEM --tls-key PEM [--tls-ca PEM]] [--transport-max-rows N]
                     [--no-transport-fault-injection]
    eaas expert-server --join URL ... [--cluster-secret-file PATH]
                     [--tls-cert PEM --tls-key PEM [--tls-ca PEM]]

Each flag overrides one `transport.*` key of the YAML file (eaas.config.TransportConfig). A bad
value is refused while parsing, naming the flag and what is allowed: the checks are
TransportConfig's own, plus "the file can be read" for paths and "the certificate and key load"
for TLS. `expert-server` takes only the secret and this host's TLS paths: where it listens is
--listen, and the request policy (max rows, fault injection) is the engine's.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

__all__ = ["ENGINE_FLAGS", "JOIN_FLAGS", "EPILOG", "add_transport_flags", "transport_overrides",
           "flag_of_field", "check_tls_files"]


def _config_value(field: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that converts, then runs TransportConfig's own check of `field`."""

    def parse(text: str) -> Any:
        from eaas.config import TransportConfig
        from eaas.errors import ConfigError

        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: an integer") from None
        try:
            TransportConfig(**{field: value})
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(" is not allowed: ", 1)[-1]
                                             + f" (got {text!r})") from None
        return value

    parse.__name__ = field  # argparse names the type in some of its messages
    return parse


def _readable_file(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a file path is needed (got '')")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file (a readable file is needed)")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read by this user")
    return text


# flag -> (dotted config key, argparse type, metavar, help)
ENGINE_FLAGS: dict[str, tuple[str, Callable[[str], Any], str, str]] = {
    "--cluster-secret-file": (
        "transport.secret_file", _readable_file, "PATH",
        "file holding the cluster secret (>= 16 characters) that every engine <-> expert-server "
        "connection proves (default: $EAAS_CLUSTER_SECRET, else one generated at start)"),
    "--transport-listen-host": (
        "transport.listen_host", _config_value("listen_host", str), "HOST",
        "interface the expert-server processes' tcp:// listeners (and the NVSHMEM rendezvous "
        "store) bind (default 127.0.0.1; a wildcard only if named here)"),
    "--tls-cert": (
        "transport.tls_cert", _readable_file, "PEM",
        "certificate chain: run the engine <-> expert-server tcp:// connections over mutual "
        "TLS (with --tls-key; not the HTTP API)"),
    "--tls-key": ("transport.tls_key", _readable_file, "PEM", "private key of --tls-cert"),
    "--tls-ca": ("transport.tls_ca", _readable_file, "PEM",
                 "CA bundle that signs the peers' certificates (default: --tls-cert itself)"),
    "--transport-max-rows": (
        "transport.max_rows", _config_value("max_rows", int), "N",
        "rows per compute request an expert server accepts; the engine splits larger batches "
        "(default 65536)"),
}
FAULT_FLAG = "--transport-fault-injection"  # and --no-...: transport.fault_injection
JOIN_FLAGS = ("--cluster-secret-file", "--tls-cert", "--tls-key", "--tls-ca")
EPILOG = ("transport security (engine <-> expert servers; `eaas serve --help`): "
          + ", ".join([*ENGINE_FLAGS, f"{FAULT_FLAG}/--no-{FAULT_FLAG[2:]}"])
          + "; `eaas expert-server` takes " + ", ".join(JOIN_FLAGS) + ".")


def add_transport_flags(p: argparse.ArgumentParser, *, join: bool = False) -> None:
    """The transport flags, in their own help group; join: the subset for expert-server."""
    group = p.add_argument_group("transport security (engine <-> expert servers)")
    for flag, (_, typ, metavar, help_) in ENGINE_FLAGS.items():
        if join and flag not in JOIN_FLAGS:
            continue
        if join and flag == "--tls-cert":
            help_ = ("this host's path of the cluster certificate (default: the engine's "
                     "transport.tls_cert path); only when the engine runs TLS")
        elif join and flag == "--cluster-secret-file":
            help_ = ("file holding the cluster secret; the engine's must equal it (default: "
                     "the secret the engine hands over when this server joins)")
        group.add_argument(flag, type=typ, default=None, metavar=metavar, help=help_)
    if not join:
        group.add_argument(FAULT_FLAG, action=argparse.BooleanOptionalAction, default=None,
                           help="servers accept the `delay` fault-injection request (default "
                           "on; turn off in production)")


def transport_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted config key: value} of the transport flags given (None: not given)."""
    out = {dotted: getattr(args, flag[2:].replace("-", "_"), None)
           for flag, (dotted, _, _, _) in ENGINE_FLAGS.items()}
    out["transport.fault_injection"] = getattr(args, FAULT_FLAG[2:].replace("-", "_"), None)
    return out


def flag_of_field(dotted: str) -> str | None:
    """The transport flag that sets config key `dotted`, if one does."""
    if dotted == "transport.fault_injection":
        return FAULT_FLAG
    return next((f for f, spec in ENGINE_FLAGS.items() if spec[0] == dotted), None)


def check_tls_files(cert: str | None, key: str | None, ca: str | None) -> None:
    """ConfigError naming the flags when cert/key/ca are not a usable TLS set."""
    from eaas.errors import ConfigError

    if cert is None and key is None and ca is None:
        return
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together (both or neither)")
    if cert is None:
        raise ConfigError("--tls-ca is only used with --tls-cert and --tls-key (TLS is mutual)")
    from eaas.transport.auth import TlsFiles

    try:
        TlsFiles(cert, key, ca).server_context()  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(f"--tls-cert/--tls-key/--tls-ca: {e}") from None
