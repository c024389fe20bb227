"""The exec's process is the container's own, command and terminal per request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from criv_agent.errors import FailedPrecondition
from criv_agent.execprocess import exec_process, write_exec_process

SPEC = {
    "process": {
        "terminal": False,
        "consoleSize": {"height": 10, "width": 20},
        "args": ["sleep", "3600"],
        "env": ["PATH=/bin", "GREETING=hi"],
        "cwd": "/tmp",
        "user": {"uid": 1001, "gid": 2001, "additionalGids": [3001]},
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
        "noNewPrivileges": True,
        "apparmorProfile": "cri-default",
    }
}


def test_container_identity_with_the_exec_command() -> None:
    p = exec_process(SPEC, ["id", "-u"], tty=False)
    assert p["args"] == ["id", "-u"] and p["terminal"] is False
    for key in ("cwd", "user", "capabilities", "noNewPrivileges", "apparmorProfile", "env"):
        assert p[key] == SPEC["process"][key], key
    assert "consoleSize" not in p
    assert SPEC["process"]["args"] == ["sleep", "3600"]  # the spec itself is untouched


def test_terminal_gets_term_unless_the_env_has_one() -> None:
    p = exec_process(SPEC, ["sh"], tty=True)
    assert p["terminal"] is True and p["env"][-1] == "TERM=xterm"
    own = {"process": {**SPEC["process"], "env": ["TERM=vt100"]}}
    assert exec_process(own, ["sh"], tty=True)["env"] == ["TERM=vt100"]


def test_no_process_or_no_spec_is_a_failed_precondition(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition):
        exec_process({}, ["true"], tty=False)
    with pytest.raises(FailedPrecondition):
        write_exec_process(str(tmp_path / "missing"), str(tmp_path), ["true"], False)


def test_written_for_crun(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SPEC))
    path = write_exec_process(str(tmp_path), str(tmp_path), ["true"], False)
    assert json.loads(Path(path).read_text())["args"] == ["true"]
