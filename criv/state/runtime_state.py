"""Runtime-wide state that outlives a restart: the pod CIDR kubelet gave us, and facts
other parts publish for Status verbose info (hypervisor choice, vsock transport...)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from criv.state.records import read_record, write_record

_KIND = "runtime"
_VERSION = 1


class RuntimeState:
    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / "runtime.json"
        self.pod_cidr = ""
        self._info: dict[str, Any] = {}
        if self._path.exists():
            _, data = read_record(self._path, _KIND, _VERSION)
            self.pod_cidr = str(data.get("pod_cidr", ""))

    async def set_pod_cidr(self, cidr: str) -> None:
        self.pod_cidr = cidr
        await asyncio.to_thread(write_record, self._path, _KIND, _VERSION, {"pod_cidr": cidr})

    def publish(self, key: str, value: Any) -> None:
        """Let a subsystem show a fact in Status verbose info."""
        self._info[key] = value

    def verbose_info(self) -> dict[str, Any]:
        return dict(self._info)
