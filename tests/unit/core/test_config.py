from __future__ import annotations

from pathlib import Path

import pytest

from criv.config import Config, load_config, parse_config
from criv.errors import ConfigError


def test_empty_file_means_defaults() -> None:
    assert parse_config("") == Config()
    assert parse_config("{}") == Config()


def test_defaults_match_documentation() -> None:
    cfg = Config()
    assert cfg.socket == "/run/criv/criv.sock"
    assert cfg.state_dir == "/var/lib/criv"
    assert cfg.run_dir == "/run/criv"
    assert cfg.log.level == "info" and cfg.log.format == "text"
    assert cfg.registries.mirrors == {} and cfg.registries.insecure == []


def test_documented_example_parses() -> None:
    cfg = parse_config(
        """
registries:
  mirrors:
    docker.io: ["http://127.0.0.1:5000"]
  insecure: ["127.0.0.1:5000"]
  auth_file: /root/.docker/config.json
log: {level: debug, format: json}
"""
    )
    assert cfg.registries.mirrors == {"docker.io": ["http://127.0.0.1:5000"]}
    assert cfg.registries.insecure == ["127.0.0.1:5000"]
    assert cfg.log.format == "json"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sockett: /x", "sockett"),
        ("log: {colour: red}", "log.colour"),
        ("log: {level: loud}", "log.level"),
        ("log: {format: xml}", "log.format"),
        ("log: [1]", "log"),
        ("registries: {insecure: host}", "registries.insecure"),
        ("registries: {mirrors: {docker.io: [5]}}", "registries.mirrors.docker.io[0]"),
        ("registries: {mirrors: {docker.io: ['ftp://x']}}", "registries.mirrors.docker.io[0]"),
        ("vm: {vcpus: 0}", "vm.vcpus"),
        ("vm: {vcpus: true}", "vm.vcpus"),
        ("state_dir: relative/dir", "state_dir"),
        ("cgroup_driver: none", "cgroup_driver"),
        ("streaming: {port: 70000}", "streaming.port"),
        ("runtime: {handlers: {host: host}}", "runtime.handlers"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    assert exc.value.key == key
    assert repr(key) in str(exc.value)


def test_invalid_yaml_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_config("a: [unclosed")


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.yaml")


def test_socket_takes_the_unix_prefix_the_docs_promise() -> None:
    from criv.config import Config
    from criv.errors import ConfigError

    Config(socket="unix:///run/criv/criv.sock").validate("")
    with pytest.raises(ConfigError, match="socket"):
        Config(socket="unix://run/criv.sock").validate("")
