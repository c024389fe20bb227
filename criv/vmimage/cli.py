"""`criv vm-image import FILE REF [--push]`: a local disk file as a containerDisk image.

The image is written as an OCI image layout in a private scratch dir under the state dir,
then the running daemon imports it into its store (it owns the store: see
criv/cri/admin.py), so ListImages shows REF at once. ``--push`` also copies the layout
to REF's registry with skopeo (the daemon's ``registries.auth_file`` for credentials).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from criv.config import Config, load_config
from criv.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from criv.image.reference import parse_reference
from criv.vmimage.containerdisk import Layout, write_layout

CONFIG_HELP = "config file (default /etc/criv/config.yaml)"
PUSH_TIMEOUT = 3600.0


def push_layout(
    layout: Layout,
    ref: str,
    *,
    tls_verify: bool = True,
    authfile: str = "",
    timeout: float = PUSH_TIMEOUT,
) -> None:
    """Copy the layout's image to ``ref``'s registry (skopeo; blocking)."""
    if shutil.which("skopeo") is None:
        raise FailedPrecondition("--push needs skopeo (apt-get install skopeo)")
    tag = _tag(ref)
    cmd = ["skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    if authfile:
        cmd.append(f"--dest-authfile={authfile}")
    cmd += [f"oci:{layout.path}:{tag}", f"docker://{ref}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"push of {ref}: skopeo still running after {timeout:.0f} s") from None
    if r.returncode != 0:
        raise Unavailable(f"push of {ref} failed: {r.stderr.strip()[-800:]}")


def _tag(ref: str) -> str:
    named = parse_reference(ref)
    if named.digest:
        raise InvalidArgument(f"{ref}: give a tag, not a digest (the digest is computed)")
    return named.tag or "latest"


def _import(args: argparse.Namespace) -> int:
    cfg: Config = load_config(Path(args.config) if args.config else None)
    disk = Path(args.file)
    if not disk.is_file():
        raise NotFound(f"{disk}: no such file")
    ref = str(parse_reference(args.ref))
    tag = _tag(ref)
    state = Path(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    # under the state dir: the daemon reads it (a systemd PrivateTmp would hide /tmp)
    work = Path(tempfile.mkdtemp(prefix=".vm-image-import-", dir=state))
    try:
        layout = write_layout(disk, work / "layout", tag=tag, name=args.name or "")
        from criv.cri.admin import import_via_daemon

        image_id = import_via_daemon(cfg.socket_path, layout.path, ref, args.timeout)
        print(f"{ref}  {image_id}  /disk/{layout.disk_name}")
        if args.push:
            push_layout(
                layout,
                ref,
                tls_verify=not args.insecure,
                authfile=cfg.registries.auth_file or "",
            )
            print(f"pushed {ref}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm-image", help="VM disk images as containerDisk images")
    vsub = p.add_subparsers(dest="vm_image_command", required=True)
    p = vsub.add_parser(
        "import", help="store a local disk file (qcow2/raw) as a containerDisk image REF"
    )
    p.add_argument("file", help="the disk file (qcow2, raw/img)")
    p.add_argument("ref", help="image reference, e.g. registry.example/vm/base:1")
    p.add_argument("--name", help="the disk's name under /disk/ (default: the file's stem)")
    p.add_argument("--push", action="store_true", help="also push REF to its registry (skopeo)")
    p.add_argument("--insecure", action="store_true", help="with --push: plain HTTP / no TLS check")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--config", help=CONFIG_HELP)
    p.set_defaults(func=_import)
