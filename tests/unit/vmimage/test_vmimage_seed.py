"""NoCloud seed content (exact text) and a real ISO read back with isoinfo."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from criv.errors import InvalidArgument
from criv.vmimage import seed

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyFakeKeyFakeKeyFakeKeyFakeKey0000 criv-pod"

CFG = seed.SeedConfig(
    instance_id="pod-1234",
    hostname="web-0",
    addresses=("10.88.0.5/16",),
    gateway="10.88.0.1",
    routes=(seed.Route("10.96.0.0/12", "10.88.0.1"),),
    dns_servers=("10.96.0.10",),
    dns_searches=("default.svc.cluster.local", "cluster.local"),
    ssh_public_key=KEY,
    mac="52:54:00:12:34:56",
)


def test_meta_data() -> None:
    assert seed.meta_data(CFG) == 'instance-id: "pod-1234"\nlocal-hostname: "web-0"\n'


def test_network_config_golden() -> None:
    assert seed.network_config(CFG) == (
        "version: 2\n"
        "ethernets:\n"
        "  eth0:\n"
        "    match:\n"
        '      macaddress: "52:54:00:12:34:56"\n'
        '    set-name: "eth0"\n'
        "    addresses:\n"
        '      - "10.88.0.5/16"\n'
        "    routes:\n"
        '      - to: "default"\n'
        '        via: "10.88.0.1"\n'
        '      - to: "10.96.0.0/12"\n'
        '        via: "10.88.0.1"\n'
        "    nameservers:\n"
        "      addresses:\n"
        '        - "10.96.0.10"\n'
        "      search:\n"
        '        - "default.svc.cluster.local"\n'
        '        - "cluster.local"\n'
    )


def test_files_parse_as_cloud_init_expects() -> None:
    files = seed.render(CFG)
    net = yaml.safe_load(files["network-config"])
    eth = net["ethernets"]["eth0"]
    assert net["version"] == 2
    assert eth["addresses"] == ["10.88.0.5/16"]
    assert eth["routes"][0] == {"to": "default", "via": "10.88.0.1"}
    assert eth["nameservers"]["search"] == ["default.svc.cluster.local", "cluster.local"]
    assert files["user-data"].startswith("#cloud-config\n")
    ud = yaml.safe_load(files["user-data"])
    assert ud["ssh_authorized_keys"] == [KEY]
    assert ud["disable_root"] is False
    assert yaml.safe_load(files["meta-data"]) == {
        "instance-id": "pod-1234",
        "local-hostname": "web-0",
    }


def test_non_root_user_gets_the_key() -> None:
    ud = yaml.safe_load(seed.user_data(dataclasses.replace(CFG, user="builder")))
    assert ud["users"][0]["name"] == "builder"
    assert ud["users"][0]["ssh_authorized_keys"] == [KEY]
    assert "ssh_authorized_keys" not in ud


def test_minimal_config_has_no_empty_sections() -> None:
    cfg = seed.SeedConfig("i", "h", ("192.168.1.2/24",), KEY)
    net = yaml.safe_load(seed.render(cfg)["network-config"])
    assert net == {"version": 2, "ethernets": {"eth0": {"addresses": ["192.168.1.2/24"]}}}


@pytest.mark.parametrize(
    "change",
    [
        {"hostname": "x\nruncmd: [reboot]"},
        {"hostname": 'a"b'},
        {"hostname": "-bad"},
        {"dns_searches": ("ok.example", "evil\n- x")},
        {"instance_id": "a: b"},
        {"user": "root\nx"},
        {"ssh_public_key": KEY + "\nssh-ed25519 AAAA second"},
        {"ssh_public_key": "not a key"},
        {"addresses": ("10.0.0.1",)},
        {"addresses": ()},
        {"gateway": "10.0.0.1\n"},
        {"dns_servers": ("8.8.8.8 #",)},
        {"routes": (seed.Route("nowhere", "10.0.0.1"),)},
        {"mac": "52:54:00:12:34:5G"},
        {"interface": "eth0: x"},
    ],
)
def test_unsafe_values_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        seed.render(dataclasses.replace(CFG, **change))  # type: ignore[arg-type]


def test_quoting_is_json_string_syntax() -> None:
    assert seed.q('a"b\n') == '"a\\"b\\n"'
    assert yaml.safe_load("k: " + seed.q("x: y # z")) == {"k": "x: y # z"}


@pytest.mark.skipif(shutil.which("isoinfo") is None, reason="isoinfo (genisoimage) missing")
def test_real_iso_reads_back(tmp_path: Path) -> None:
    out = seed.build_seed(CFG, tmp_path / "seed.iso")
    pvd = subprocess.run(["isoinfo", "-d", "-i", str(out)], capture_output=True, text=True)
    assert "Volume id: cidata" in pvd.stdout
    assert "Rock Ridge" in pvd.stdout
    listing = subprocess.run(
        ["isoinfo", "-R", "-f", "-i", str(out)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]
    for name, text in seed.render(CFG).items():
        got = subprocess.run(
            ["isoinfo", "-R", "-i", str(out), "-x", f"/{name}"],
            capture_output=True,
            check=True,
        ).stdout
        assert got.decode() == text
    assert not list(tmp_path.glob(".*partial"))
