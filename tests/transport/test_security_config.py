"""`transport:` config keys: validated with errors naming the field; exported to the server
processes (listen host, TLS files, request policy) through one environment variable."""

from __future__ import annotations

import pytest

from eaas.config import EngineConfig
from eaas.engine.server_policy import RequestGuard
from eaas.engine.server_process import prepare_server_env, server_argv
from eaas.errors import ConfigError
from eaas.transport.auth import SECRET_ENV, SETTINGS_ENV, TransportSecurity, exported_settings


@pytest.mark.parametrize("transport, field", [
    ({"tls_cert": "c.pem"}, "transport.tls_key"),
    ({"tls_ca": "ca.pem"}, "transport.tls_ca"),
    ({"listen_host": "127.0.0.1:9000/x"}, "transport.listen_host"),
    ({"listen_host": ""}, "transport.listen_host"),
    ({"max_rows": 0}, "transport.max_rows"),
    ({"fault_injection": "no"}, "transport.fault_injection"),
    ({"secret_file": ""}, "transport.secret_file"),
    ({"secret": "x"}, "transport.'secret'"),
])
def test_bad_transport_keys_name_the_field(transport: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        EngineConfig.from_dict({"model": "m", "transport": transport})


def test_the_engine_exports_its_settings_to_its_server_processes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "")  # recorded: teardown restores (or unsets) it
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.setenv(SETTINGS_ENV, "")  # recorded: teardown restores (or unsets) it
    monkeypatch.delenv(SETTINGS_ENV)
    argv = server_argv("m", {}, dtype="float32", device="cpu", load_format="auto",
                       batch_invariant=True, transport="tcp")
    assert argv[argv.index("--listen") + 1] == "tcp://127.0.0.1:0"  # the default: loopback
    cfg = EngineConfig.from_dict({"model": "m", "transport": {
        "listen_host": "10.1.2.3", "max_rows": 128, "fault_injection": False,
        "tls_cert": "c.pem", "tls_key": "k.pem"}})
    prepare_server_env(cfg)
    assert exported_settings()["listen_host"] == "10.1.2.3"
    argv = server_argv("m", {}, dtype="float32", device="cpu", load_format="auto",
                       batch_invariant=True, transport="tcp")
    assert argv[argv.index("--listen") + 1] == "tcp://10.1.2.3:0"
    guard = RequestGuard.from_env()
    assert (guard.max_rows, guard.fault_injection) == (128, False)
    security = TransportSecurity.from_env()  # a server process reads the same
    assert security.tls is not None and security.tls.cert == "c.pem"
    assert len(security.secret) == 64  # generated at "start"


def test_a_server_started_without_the_engines_settings_refuses_fault_injection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SETTINGS_ENV, "")  # recorded: teardown restores (or unsets) it
    monkeypatch.delenv(SETTINGS_ENV)
    guard = RequestGuard.from_env()
    with pytest.raises(PermissionError):
        guard.check({"op": "delay", "seconds": 0.1})
    assert guard.refused == 1
    on = RequestGuard(fault_injection=True)
    on.check({"op": "delay", "seconds": 0.1})
    for bad in (1e9, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError):
            on.check({"op": "delay", "seconds": bad})
