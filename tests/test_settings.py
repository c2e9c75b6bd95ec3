"""Settings: flags over env over TOML over defaults, validated once."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from tandem.server import logs
from tandem.server.settings import Settings, SettingsError, load


def test_defaults_bind_loopback():
    settings = load(["--reranker", "none"], {})
    assert settings == Settings(reranker=None)
    assert (settings.host, settings.port) == ("127.0.0.1", 50051)


def test_flags_beat_env_beat_toml(tmp_path: Path):
    config = tmp_path / "tandem.toml"
    config.write_text("port = 7000\nmax_in_flight = 9\nmax-top-n = 50\nallow_remote = true\n")
    environ = {"TANDEM_CONFIG": str(config), "TANDEM_PORT": "7001", "TANDEM_THREADS": "1"}
    settings = load(["--port", "7002", "--reranker", "none"], environ)
    assert settings.port == 7002  # flag
    assert settings.threads == 1  # env
    assert settings.max_in_flight == 9  # file
    assert settings.max_top_n == 50  # file, dashed key
    assert settings.allow_remote is True
    assert settings.reranker is None
    assert settings.max_recall_k == Settings().max_recall_k  # default


def test_token_file_and_token_is_never_in_repr(tmp_path: Path):
    secret = tmp_path / "token"
    secret.write_text("abc123\n")
    settings = load(["--token-file", str(secret), "--reranker", "none"], {})
    assert settings.token == "abc123"
    assert "abc123" not in repr(settings)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--host", "0.0.0.0"], {}, "pass --allow-remote"),
        (["--port", "70000"], {}, "outside 0-65535"),
        (["--tls-cert", "/nonexistent.pem"], {}, "tls_cert and tls_key go together"),
        ([], {"TANDEM_MAX_IN_FLIGHT": "0"}, "max_in_flight must be at least 1"),
        ([], {"TANDEM_MAX_IN_FLIGHT": "lots"}, "max_in_flight (env)"),
        ([], {"TANDEM_ALLOW_REMOTE": "maybe"}, "not a boolean"),
        (["--index-dtype", "f64"], {}, "not i8, f16 or f32"),
        (["--default-top-n", "10", "--max-top-n", "5"], {}, "larger than max_top_n"),
        (["--token", " "], {}, "token is empty"),
        # A mistyped path is a start-up error, never a silently retrieve-only server.
        (["--reranker", "artifacts/cross-encodr"], {}, "--reranker none to serve retrieve-only"),
        (["--expansion-search", "0"], {}, "expansion_search must be at least 1"),
        (["--first-stage", "sparse"], {}, "not one of dense, lexical, hybrid"),
        (["--dense-weight", "0", "--lexical-weight", "0"], {}, "both 0"),
        (["--rrf-k", "0"], {}, "rrf_k must be at least 1"),
    ],
)
def test_bad_settings_say_what_to_fix(argv, environ, message):
    with pytest.raises(SettingsError) as caught:
        load(argv, environ)
    assert message in str(caught.value)


def test_config_file_errors(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load(["--config", str(bad)], {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown settings: prot"):
        load(["--config", str(unknown)], {})


def test_remote_bind_with_the_flag():
    settings = load(["--host", "0.0.0.0", "--allow-remote", "--reranker", "none"], {})
    assert settings.host == "0.0.0.0"


def test_json_logs_keep_extra_fields():
    stream = io.StringIO()
    logs.configure(level="info", style="json", stream=stream)
    try:
        logging.getLogger("tandem.server.test").info("call", extra={"method": "Search", "ms": 1.5})
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(stream.getvalue())
    assert record["msg"] == "call"
    assert record["method"] == "Search"
    assert record["ms"] == 1.5
    assert record["level"] == "info"
