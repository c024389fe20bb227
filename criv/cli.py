"""The `criv` command line: serve (or --daemon) / stop, config, doctor, image build / pull,
kubelet-config, vm-image import, version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

from criv import __version__
from criv.config import Config, load_config
from criv.errors import CrivError
from criv.logsetup import setup_logging
from criv.ops.cli import register as register_ops
from criv.vmimage.cli import register as register_vmimage

# glibc gives each thread that allocates an arena of its own (up to 8 per core); criv's
# threads (asyncio.to_thread, gRPC) come and go, and each new arena lifts the daemon's RSS
# for good by megabytes of fragments. Two arenas keep it lower and flat (M_ARENA_MAX).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas)


def _load(path: str | None) -> Config:
    return load_config(Path(path) if path else None)


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    on_ready = None
    if args.daemon:
        from criv import service

        # fork before the daemon's imports start any thread
        detached = service.daemonize(
            Path(args.pid_file) if args.pid_file else service.default_pid_file(cfg),
            Path(args.log_file) if args.log_file else service.DEFAULT_LOG_FILE,
        )
        if detached.exit_code is not None:
            return detached.exit_code
        on_ready = detached.ready
    from criv.daemon import Daemon  # heavy imports only for the daemon

    limit_malloc_arenas()
    setup_logging(cfg.log)
    asyncio.run(Daemon(cfg, on_ready).run())
    return 0


def _stop(args: argparse.Namespace) -> int:
    from criv import service

    pid_file = (
        Path(args.pid_file) if args.pid_file else service.default_pid_file(_load(args.config))
    )
    return service.stop(pid_file, args.timeout)


def _kubelet_config(args: argparse.Namespace) -> int:
    from criv.config import DEFAULT_CONFIG_PATH
    from criv.kubelet import SECTIONS, render

    cfg = _load(args.config)
    if args.config:
        source = f"config {args.config}"
    else:
        source = f"config {DEFAULT_CONFIG_PATH}" if DEFAULT_CONFIG_PATH.exists() else "defaults"
    print(render(cfg, source, (args.only,) if args.only else SECTIONS), end="")
    return 0


def _image_pull(args: argparse.Namespace) -> int:
    from criv.cri.imagepull import pull

    return pull(_load(args.config).socket_path, args.ref, args.timeout)


def _config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if args.action == "show":
        print(json.dumps(cfg.public_dict(), indent=2, sort_keys=True))
    else:
        print("configuration OK")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from criv.doctor import run_doctor

    return run_doctor(_load(args.config), fix=args.fix)


def _image_build(args: argparse.Namespace) -> int:
    from criv.doctor import guest_image_cache
    from criv.guestimage import Inputs, build_guest_image

    cfg = _load(args.config)
    cache = Path(args.cache) if args.cache else guest_image_cache(cfg)
    kernel = args.kernel or cfg.vm.guest_kernel
    root: Literal["disk", "initramfs"] = "initramfs" if args.lz4 else args.root
    inputs = dataclasses.replace(Inputs.default(), compress=args.lz4, kernel=kernel, root=root)
    from criv.progress import BuildProgress, expected_builds

    with BuildProgress(cache, expected_builds(cache, inputs)) as show:
        img = build_guest_image(cache, show, inputs)
    if args.prune:
        from criv.guestimage.build import prune_cache

        for name in prune_cache(cache, img):
            print(f"pruned {cache / name}")
    print(f"kernel: {img.kernel}\ninitrd: {img.initrd}")
    if img.root_disk is not None:
        print(f"root:   {img.root_disk}")
    print(f"hash:   {img.hash}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="criv", description="criv: a CRI runtime of VM pods")
    ap.add_argument("--version", action="version", version=f"criv {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the CRI daemon (in the foreground by default)")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument(
        "--daemon",
        action="store_true",
        help="detach (where no systemd runs criv); returns once the socket is served",
    )
    p.add_argument("--pid-file", help="with --daemon (default <run_dir>/criv.pid)")
    p.add_argument("--log-file", help="with --daemon (default /var/log/criv.log)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("stop", help="stop a `criv serve --daemon` (SIGTERM, wait)")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument("--pid-file", help="default <run_dir>/criv.pid")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait (default 90)")
    p.set_defaults(func=_stop)

    p = sub.add_parser(
        "kubelet-config", help="kubelet flags and RuntimeClass YAML for this configuration"
    )
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument(
        "--only",
        choices=["flags", "kubelet", "runtimeclasses"],
        help="print one part: kubelet flags, KubeletConfiguration, or RuntimeClasses",
    )
    p.set_defaults(func=_kubelet_config)

    p = sub.add_parser("config", help="check or show the effective configuration")
    p.add_argument("action", choices=["check", "show"])
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.set_defaults(func=_config)

    p = sub.add_parser("doctor", help="check whether this machine can run criv's pods")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument("--fix", action="store_true", help="set qemu.conf and start libvirtd")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("image", help="the guest image (build); pre-pull container images (pull)")
    isub = p.add_subparsers(dest="image_command", required=True)
    p = isub.add_parser("build", help="build the guest image, or find it cached")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument("--cache", help="cache directory (default <state_dir>/cache/guest-image)")
    p.add_argument(
        "--root",
        choices=["disk", "initramfs"],
        default="disk",
        help="the guest root: a read-only erofs disk (default) or in the initramfs",
    )
    p.add_argument("--lz4", action="store_true", help="the root in an lz4-compressed initramfs")
    p.add_argument(
        "--kernel",
        choices=["criv", "debian"],
        help="criv: build our kernel; debian: the packaged kernel (fallback); "
        "default: vm.guest_kernel from the config",
    )
    p.add_argument(
        "--prune", action="store_true", help="remove cached stages this image does not use"
    )
    p.set_defaults(func=_image_build)
    p = isub.add_parser("pull", help="pull a container image through the running criv")
    p.add_argument("ref", help="image reference, e.g. docker.io/library/busybox:latest")
    p.add_argument("--config", help="config file (default /etc/criv/config.yaml)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    p.set_defaults(func=_image_pull)

    register_ops(sub)  # pods, containers, inspect, console, debug: criv/ops/cli.py
    register_vmimage(sub)  # vm-image import: criv/vmimage/cli.py

    args = ap.parse_args(argv)
    try:
        rc: int = args.func(args)
    except CrivError as e:
        print(f"criv: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
