"""`criv vm-image import FILE REF` and `criv vm-image commit CONTAINER REF`: a disk as a
containerDisk image, each ``[--push [--insecure]]``.

Both go one way: the image is written as an OCI image layout in a private scratch dir
under the state dir (import: by the CLI from the file; commit: by the daemon, from the
stopped container's flattened disk), the running daemon imports it into its store (it
owns the store and the containers: see criv/cri/admin.py), so ListImages shows REF at
once; ``--push`` then copies the layout to REF's registry with skopeo (the daemon's
``registries.auth_file`` for credentials).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from criv.config import Config, load_config
from criv.errors import FailedPrecondition, NotFound, Unavailable
from criv.vmimage.containerdisk import SCRATCH_PREFIX, Layout, layout_ref, write_layout

CONFIG_HELP = "config file (default /etc/criv/config.yaml)"
PUSH_TIMEOUT = 3600.0


def push_layout(
    layout: Layout | Path,
    ref: str,
    *,
    tls_verify: bool = True,
    authfile: str = "",
    timeout: float = PUSH_TIMEOUT,
) -> None:
    """Copy the layout's image to ``ref``'s registry (skopeo; blocking)."""
    if shutil.which("skopeo") is None:
        raise FailedPrecondition("--push needs skopeo (apt-get install skopeo)")
    path = layout.path if isinstance(layout, Layout) else layout
    _, tag = layout_ref(ref)
    cmd = ["skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}"]
    if authfile:
        cmd.append(f"--dest-authfile={authfile}")
    cmd += [f"oci:{path}:{tag}", f"docker://{ref}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"push of {ref}: skopeo still running after {timeout:.0f} s") from None
    if r.returncode != 0:
        raise Unavailable(f"push of {ref} failed: {r.stderr.strip()[-800:]}")


def _store(
    args: argparse.Namespace,
    kind: str,
    make: Callable[[Config, Path, str, str], tuple[str, Path, str]],
) -> int:
    """What import and commit share: a scratch dir under the state dir (the daemon reads
    and writes it: a systemd PrivateTmp would hide /tmp), ``make`` (which has the daemon
    store the image and answers its id, layout and disk name), the line printed, the push
    and the clean-up."""
    cfg: Config = load_config(Path(args.config) if args.config else None)
    ref, tag = layout_ref(args.ref)
    state = Path(cfg.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{kind}-", dir=state))
    try:
        image_id, layout, disk_name = make(cfg, work, ref, tag)
        print(f"{ref}  {image_id}  /disk/{disk_name}")
        if args.push:
            push_layout(
                layout, ref, tls_verify=not args.insecure, authfile=cfg.registries.auth_file or ""
            )
            print(f"pushed {ref}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    disk = Path(args.file)
    if not disk.is_file():
        raise NotFound(f"{disk}: no such file")

    def make(cfg: Config, work: Path, ref: str, tag: str) -> tuple[str, Path, str]:
        from criv.cri.admin import import_via_daemon  # not for every criv command

        layout = write_layout(disk, work / "layout", tag=tag, name=args.name or "")
        image_id = import_via_daemon(cfg.socket_path, layout.path, ref, args.timeout)
        return image_id, layout.path, layout.disk_name

    return _store(args, "import", make)


def _commit(args: argparse.Namespace) -> int:
    def make(cfg: Config, work: Path, ref: str, tag: str) -> tuple[str, Path, str]:
        from criv.cri.admin import COMMIT_CONTAINER, call_daemon  # not for every criv command

        request = {"container": args.container, "ref": ref, "workdir": str(work)}
        request["name"] = args.name or ""
        answer = call_daemon(cfg.socket_path, COMMIT_CONTAINER, request, args.timeout)
        layout, disk = answer.get("layout"), answer.get("disk")
        if not isinstance(layout, str) or Path(layout).parent != work or not isinstance(disk, str):
            raise Unavailable(f"unexpected answer from criv: {answer!r}")
        return str(answer["id"]), Path(layout), disk

    return _store(args, "commit", make)


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("ref", help="image reference, e.g. registry.example/vm/base:1")
    p.add_argument("--name", help=f"the disk's name under /disk/ (default: {what})")
    p.add_argument("--push", action="store_true", help="also push REF to its registry (skopeo)")
    p.add_argument("--insecure", action="store_true", help="with --push: plain HTTP / no TLS check")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--config", help=CONFIG_HELP)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm-image", help="VM disk images as containerDisk images")
    vsub = p.add_subparsers(dest="vm_image_command", required=True)
    p = vsub.add_parser(
        "import", help="store a local disk file (qcow2/raw) as a containerDisk image REF"
    )
    p.add_argument("file", help="the disk file (qcow2, raw/img)")
    _common(p, "the file's stem")
    p.set_defaults(func=_import)
    p = vsub.add_parser(
        "commit",
        help="store a stopped vm-image container's disk, flattened, as a containerDisk image REF",
    )
    p.add_argument("container", help="the container id (or a unique prefix)")
    _common(p, "its base disk's")
    p.set_defaults(func=_commit)
