"""`criv kubelet-config`: its output follows the config, and docs/kubernetes.md shows it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from criv.cli import main
from criv.config import Config, parse_config
from criv.kubelet import VM_POD_OVERHEAD_MIB, render

DOC = Path(__file__).resolve().parents[3] / "docs" / "kubernetes.md"
BEGIN = "<!-- criv kubelet-config: begin -->\n```text\n"
END = "```\n<!-- criv kubelet-config: end -->"


def _yaml_docs(text: str) -> list[dict[str, object]]:
    body = text[text.index("---") :]
    return [d for d in yaml.safe_load_all(body) if d]


def test_docs_show_the_output_for_the_default_config() -> None:
    doc = DOC.read_text()
    assert BEGIN in doc and END in doc, "the embedded output's markers are missing"
    shown = doc.split(BEGIN, 1)[1].split(END, 1)[0]
    assert shown == render(Config(), "defaults"), (
        "docs/kubernetes.md is out of date: paste `criv kubelet-config` (default config)"
    )


def test_docs_overhead_is_the_constant() -> None:
    doc = DOC.read_text()
    assert f"memory: {VM_POD_OVERHEAD_MIB}Mi" in doc
    assert f"{VM_POD_OVERHEAD_MIB} MiB each with" in doc


def test_default_config() -> None:
    out = render(Config(), "defaults")
    assert "--container-runtime-endpoint=unix:///run/criv/criv.sock" in out
    assert "--image-service-endpoint=unix:///run/criv/criv.sock" in out
    assert "--cgroup-driver=cgroupfs" in out
    docs = _yaml_docs(out)
    kubelet = docs[0]
    assert kubelet["kind"] == "KubeletConfiguration"
    assert kubelet["containerRuntimeEndpoint"] == "unix:///run/criv/criv.sock"
    classes = {d["handler"]: d for d in docs[1:]}
    assert set(classes) == {"vm", "host"}
    assert classes["vm"]["overhead"] == {"podFixed": {"memory": f"{VM_POD_OVERHEAD_MIB}Mi"}}
    assert "overhead" not in classes["host"]


def test_follows_the_config() -> None:
    cfg = parse_config(
        """
socket: /var/run/other/criv.sock
cgroup_driver: systemd
runtime:
  handlers: {"": vm, kata: vm, trusted: host}
  host_pods: reject
"""
    )
    out = render(cfg, "config x")
    assert "--container-runtime-endpoint=unix:///var/run/other/criv.sock" in out
    assert "--cgroup-driver=systemd" in out
    docs = _yaml_docs(out)
    assert docs[0]["cgroupDriver"] == "systemd"
    # the host handler would be refused on this node: no RuntimeClass for it
    assert [d["handler"] for d in docs[1:]] == ["kata"]
    assert "runtime.host_pods is reject" in out


def test_cli_reads_config_and_prints_one_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("socket: /tmp/x/criv.sock\n")
    assert main(["kubelet-config", "--config", str(conf), "--only", "runtimeclasses"]) == 0
    out = capsys.readouterr().out
    assert "--container-runtime-endpoint" not in out
    classes = [d for d in yaml.safe_load_all(out) if d]
    assert {c["kind"] for c in classes} == {"RuntimeClass"}
    assert main(["kubelet-config", "--config", str(conf), "--only", "flags"]) == 0
    out = capsys.readouterr().out
    assert f"(config {conf})" in out
    assert "--image-service-endpoint=unix:///tmp/x/criv.sock" in out.splitlines()
