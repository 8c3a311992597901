"""The transport-security flags (`eaas serve/config/... --cluster-secret-file --tls-cert ...`,
`eaas expert-server --cluster-secret-file --tls-cert ...`): listed in --help, mapped onto the
`transport.*` config keys, bad values refused naming the flag and what is allowed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from eaas.cli import main
from eaas.config import EngineConfig
from eaas.engine.joiner import JoinOptions, JoinRefused, _adopt_transport_env
from eaas.model.tiny import make_config_only
from eaas.transport.auth import SECRET_ENV, SETTINGS_ENV

from .transport.raw_peer import self_signed

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl CLI")
FLAGS = ["--cluster-secret-file", "--transport-listen-host", "--tls-cert", "--tls-key",
         "--tls-ca", "--transport-max-rows", "--no-transport-fault-injection"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_config_only(tmp_path_factory.mktemp("cli-transport") / "m", "qwen3_moe"))


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("cli-test-cluster-secret-0123456789\n")
    path.chmod(0o600)
    return path


def test_help_lists_the_transport_flags(capsys) -> None:
    for argv, flags in ((["--help"], FLAGS), (["serve", "--help"], FLAGS),
                        (["expert-server", "--help"], FLAGS[:1] + FLAGS[2:5])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps (and splits) lines
        missing = [f for f in flags if f not in out.replace("- ", "-")]
        assert not missing, f"`eaas {' '.join(argv)}` does not list {missing}"


@needs_openssl
def test_flags_set_the_transport_config_keys(model, secret_file, tmp_path, capsys) -> None:
    tls = self_signed(tmp_path, "cluster")
    assert main(["config", model, "--load-format", "dummy", "--cluster-secret-file",
                 str(secret_file), "--transport-listen-host", "10.0.0.5", "--tls-cert", tls.cert,
                 "--tls-key", tls.key, "--tls-ca", tls.cert, "--transport-max-rows", "128",
                 "--no-transport-fault-injection"]) == 0
    t = EngineConfig.from_yaml(capsys.readouterr().out).transport
    assert (t.secret_file, t.listen_host, t.tls_cert, t.tls_key, t.tls_ca, t.max_rows,
            t.fault_injection) == (str(secret_file), "10.0.0.5", tls.cert, tls.key, tls.cert,
                                   128, False)


def test_flags_override_the_yaml_file(model, tmp_path, capsys) -> None:
    path = tmp_path / "eaas.yaml"
    path.write_text("transport: {max_rows: 7, listen_host: 10.0.0.9}\n")
    assert main(["config", model, "--config", str(path), "--transport-max-rows", "9",
                 "--load-format", "dummy"]) == 0
    t = EngineConfig.from_yaml(capsys.readouterr().out).transport
    assert (t.max_rows, t.listen_host, t.fault_injection) == (9, "10.0.0.9", True)
    path.write_text("transport: {max_rows: 0}\n")  # the file's mistake names the file's key
    assert main(["config", model, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "transport.max_rows=0 is not allowed" in err and "--transport-max-rows" not in err


@pytest.mark.parametrize(("flag", "value", "allowed"), [
    ("--transport-max-rows", "0", "an integer >= 1 (got '0')"),
    ("--transport-max-rows", "many", "'many' is not allowed: an integer"),
    ("--transport-listen-host", "", "a host name or IP address to bind"),
    ("--transport-listen-host", "tcp://10.0.0.5", "a host name or IP address to bind"),
    ("--cluster-secret-file", "/nonexistent/secret", "is not a file"),
    ("--tls-cert", "/nonexistent/cert.pem", "is not a file"),
])
def test_a_bad_value_names_the_flag_and_what_is_allowed(model, flag, value, allowed,
                                                        capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["config", model, flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and allowed in err, err


@needs_openssl
def test_tls_files_that_do_not_fit_together_are_refused(model, tmp_path, capsys) -> None:
    a, b = self_signed(tmp_path, "a"), self_signed(tmp_path, "b")
    assert main(["config", model, "--tls-cert", a.cert]) == 2
    err = capsys.readouterr().err
    assert "--tls-key: transport.tls_key=None is not allowed" in err, err
    assert main(["config", model, "--tls-cert", a.cert, "--tls-key", b.key]) == 2  # b's key
    assert "--tls-cert/--tls-key/--tls-ca: cannot load TLS files" in capsys.readouterr().err
    join = ["expert-server", "--join", "http://127.0.0.1:9", "--token", "t" * 16]
    assert main([*join, "--tls-key", a.key]) == 2  # checked before contacting the engine
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def _ticket(secret: str | None, settings: dict | None = None) -> dict:
    return {"cluster_secret": secret, "transport_settings": settings or {}}


def test_a_joining_server_holds_its_own_secret_and_tls_paths(secret_file, monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "")  # recorded, so teardown restores (or unsets) it
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.setenv(SETTINGS_ENV, "")
    monkeypatch.delenv(SETTINGS_ENV)
    here = JoinOptions(url="http://e:8000", token="t", secret_file=str(secret_file),
                       tls_cert="/here/c.pem", tls_key="/here/k.pem")
    engine = {"tls_cert": "/there/c.pem", "tls_key": "/there/k.pem", "tls_ca": None,
              "max_rows": 64}
    _adopt_transport_env(_ticket(secret_file.read_text().strip(), engine), here)
    assert os.environ[SECRET_ENV] == secret_file.read_text().strip()
    assert json.loads(os.environ[SETTINGS_ENV]) == {**engine, "tls_cert": "/here/c.pem",
                                                    "tls_key": "/here/k.pem"}
    with pytest.raises(JoinRefused, match="is not the one in --cluster-secret-file"):
        _adopt_transport_env(_ticket("another-engines-secret-0123456789", engine), here)
    with pytest.raises(JoinRefused, match="does not run tcp:// over TLS"):
        _adopt_transport_env(_ticket(None, {"max_rows": 64}), here)
