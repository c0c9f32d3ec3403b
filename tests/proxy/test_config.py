from __future__ import annotations

from pathlib import Path

import pytest

from proxy import cli
from proxy.config import FIELDS, Config, ConfigError, docs_table, load, parse_listen


def test_defaults_are_valid() -> None:
    config = load({}, environ={})
    assert config == Config()
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.primary_url is None


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "proxy.toml"
    toml.write_text('read_timeout_s = 5\nlisten = "0.0.0.0:9000"\nlog_level = "debug"\n')
    env = {"REPLICA_PROXY_READ_TIMEOUT_S": "7.5", "REPLICA_PROXY_LISTEN": "127.0.0.1:9001"}
    config = load({"listen": "127.0.0.1:9002"}, environ=env, config_file=str(toml))
    assert config.listen == "127.0.0.1:9002"  # flag wins
    assert config.read_timeout_s == 7.5  # env beats file
    assert config.log_level == "debug"  # file beats default


def test_config_file_from_environment(tmp_path: Path) -> None:
    toml = tmp_path / "proxy.toml"
    toml.write_text('primary_url = "http://db:8000"\n')
    config = load({}, environ={"REPLICA_PROXY_CONFIG": str(toml)})
    assert config.primary_url == "http://db:8000"


@pytest.mark.parametrize(
    ("raw", "expected"), [("41943040", 41943040), ("40MiB", 40 << 20), ("512k", 512 << 10)]
)
def test_byte_sizes(raw: str, expected: int) -> None:
    assert load({"max_body_bytes": raw}, environ={}).max_body_bytes == expected


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        ({"listen": "8000"}, "listen"),
        ({"listen": "host:99999"}, "listen"),
        ({"primary_url": "ftp://x"}, "primary_url"),
        ({"primary_url": "http://db:8000/api"}, "primary_url"),
        ({"primary_url": "http://db:notaport"}, "primary_url"),
        ({"read_timeout_s": "soon"}, "read_timeout_s"),
        ({"read_timeout_s": "-1"}, "read_timeout_s"),
        ({"connect_timeout_s": "0"}, "connect_timeout_s"),
        ({"max_upstream_connections": "1.5"}, "max_upstream_connections"),
        ({"max_body_bytes": "40 parsecs"}, "max_body_bytes"),
        ({"log_level": "loud"}, "log_level"),
        ({"sample_data": "maybe"}, "sample_data"),
    ],
)
def test_bad_values_name_the_key(flags: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(flags, environ={})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}=")


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    toml = tmp_path / "proxy.toml"
    toml.write_text("read_timout_s = 5\n")
    with pytest.raises(ConfigError, match="read_timout_s"):
        load({}, environ={}, config_file=str(toml))
    with pytest.raises(ConfigError, match="REPLICA_PROXY_LISTN"):
        load({}, environ={"REPLICA_PROXY_LISTN": "x"})


def test_toml_types_are_checked(tmp_path: Path) -> None:
    toml = tmp_path / "proxy.toml"
    toml.write_text("max_upstream_connections = 2.5\n")
    with pytest.raises(ConfigError, match="max_upstream_connections"):
        load({}, environ={}, config_file=str(toml))


def test_ipv6_listen() -> None:
    assert parse_listen("[::1]:8000") == ("::1", 8000)


def test_every_key_is_documented_in_readme() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert docs_table() in readme, "README config table is stale: run `make docs`"
    assert all(f.metadata["help"] for f in FIELDS.values())


def test_cli_bad_config_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--listen", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "listen" in err


def test_cli_unknown_flag_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--no-such-flag"])
    assert info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
