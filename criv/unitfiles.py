"""`make install-service`: criv as a service, under systemd where it runs, else detached.

Installs etc/systemd/criv.service (filled in with this checkout's `criv`), the tmpfiles
and sysusers snippets, and brings criv up:

- systemd running: libvirt's qemu.conf as criv needs it, libvirtd and virtlogd enabled
  and started through systemctl, then ``systemctl enable criv`` and a (re)start, which
  keeps running pods (``KillMode=process``; the new criv re-adopts them);
- no systemd (containers, this project's CI machines): the files are still installed
  for later, libvirt is set up as ``make services`` does, and criv starts with
  ``criv serve --daemon`` unless one already runs. Nothing restarts it after a reboot.

Usage: ``python -m criv.unitfiles install [--root DIR] [--config FILE] [--no-start]``.
``--root`` writes the files under DIR (tests, packaging) and starts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from criv.commands import run_sync

REPO = Path(__file__).resolve().parents[1]
ETC = REPO / "etc"
CRIV_BIN = Path(sys.executable).parent / "criv"


@dataclass(frozen=True)
class UnitFile:
    source: Path  # under etc/
    target: Path  # absolute, under the root


FILES = (
    UnitFile(ETC / "systemd/criv.service", Path("/etc/systemd/system/criv.service")),
    UnitFile(ETC / "tmpfiles.d/criv.conf", Path("/etc/tmpfiles.d/criv.conf")),
    UnitFile(ETC / "sysusers.d/criv.conf", Path("/etc/sysusers.d/criv.conf")),
)


def systemd_running() -> bool:
    """sd_booted(3): systemd is PID 1 when it has made this directory."""
    return Path("/run/systemd/system").is_dir()


def render(source: Path, criv_bin: Path = CRIV_BIN, config: Path | None = None) -> str:
    args = f" --config {config}" if config else ""
    text = source.read_text()
    return (
        text.replace("@CRIV@", str(criv_bin)).replace("@ARGS@", args).replace("@REPO@", str(REPO))
    )


def write_files(root: Path, criv_bin: Path = CRIV_BIN, config: Path | None = None) -> list[Path]:
    """Write every file under ``root``; returns the paths written."""
    out = []
    for f in FILES:
        dest = root / f.target.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(render(f.source, criv_bin, config))
        dest.chmod(0o644)
        out.append(dest)
    return out


# systemctl restart waits for the old unit to stop (its own stop timeout is 90 s)
_SYSTEMCTL_TIMEOUT = 300.0


def _run(argv: list[str]) -> None:
    print("+ " + " ".join(argv), flush=True)
    run_sync(argv, check=True, capture=False, timeout=_SYSTEMCTL_TIMEOUT)


def _apply_snippets(written: list[Path]) -> None:
    # both tools work without systemd as PID 1
    sysusers = next(p for p in written if "sysusers.d" in p.parts)
    tmpfiles = next(p for p in written if "tmpfiles.d" in p.parts)
    if shutil.which("systemd-sysusers"):
        _run(["systemd-sysusers", str(sysusers)])
    if shutil.which("systemd-tmpfiles"):
        _run(["systemd-tmpfiles", "--create", str(tmpfiles)])


def _start_systemd() -> None:
    from criv.hypervisor.hostsetup import QEMU_CONF, ensure_qemu_conf

    changed = ensure_qemu_conf()
    _run(["systemctl", "daemon-reload"])
    _run(["systemctl", "enable", "--now", "virtlogd.service", "libvirtd.service"])
    if changed:
        print(f"{QEMU_CONF} changed: restarting libvirtd (it reads it at start only)")
        _run(["systemctl", "restart", "libvirtd.service"])
    _run(["systemctl", "enable", "criv.service"])
    # a restart of a running criv keeps its pods: the new one re-adopts them
    _run(["systemctl", "restart", "criv.service"])
    _run(["systemctl", "--no-pager", "status", "criv.service"])


def _start_detached(criv_bin: Path, config: Path | None) -> None:
    from criv import service
    from criv.config import load_config
    from criv.hypervisor.hostsetup import ensure_host_services

    for line in ensure_host_services():
        print(line)
    conf = ["--config", str(config)] if config else []
    pid = service.running_pid(service.default_pid_file(load_config(config)))
    if pid is not None:
        # as `systemctl restart` does under systemd: the new criv re-adopts the pods
        _run([str(criv_bin), "stop", *conf])
    argv = [str(criv_bin), "serve", "--daemon", *conf]
    print("+ " + " ".join(argv), flush=True)
    rc = subprocess.run(argv).returncode
    if rc != 0:
        raise SystemExit(rc)


def install(root: Path, config: Path | None, start: bool) -> None:
    written = write_files(root, CRIV_BIN, config)
    for p in written:
        print(f"installed {p}")
    if root != Path("/"):
        return
    _apply_snippets(written)
    if not start:
        return
    if systemd_running():
        _start_systemd()
        return
    print("systemd is not running here: starting criv with `criv serve --daemon`")
    print("(nothing restarts it after a reboot; `criv stop` stops it)")
    _start_detached(CRIV_BIN, config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m criv.unitfiles")
    ap.add_argument("action", choices=["install"])
    ap.add_argument("--root", default="/", help="install under this directory (starts nothing)")
    ap.add_argument("--config", help="criv config file for the unit's `criv serve`")
    ap.add_argument("--no-start", action="store_true", help="install the files only")
    args = ap.parse_args(argv)
    install(Path(args.root), Path(args.config) if args.config else None, not args.no_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
