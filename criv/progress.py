"""Progress display for `criv image build` (and so `make run`'s first build).

The builder reports plain "phase: message" lines (criv/guestimage/build.py); this module
turns them into phases with elapsed time and an estimate of what is left, taken from the
last build's per-phase timings (``build-timings.json`` in the cache dir). It lives outside
criv/guestimage on purpose: the image's cache key hashes the builder's source files, and
a change to how progress looks must not rebuild the image.

On a terminal: a rich live display (spinner, phase, bar, estimate, elapsed) with the
builder's lines scrolling above it. Otherwise (CI logs, pipes): plain lines, each with the
elapsed time, and one line per phase with the estimate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.text import Text

from criv.atomicfile import write_atomic

PHASES = ("kernel", "rootfs", "image")
# builder line prefixes that belong to a phase of another name
_ALIASES = {"initramfs": "image"}
TIMINGS_FILE = "build-timings.json"
TIMINGS_VERSION = 1


def fmt_duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def load_timings(cache_root: Path) -> dict[str, float]:
    try:
        data = json.loads((cache_root / TIMINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != TIMINGS_VERSION:
        return {}
    phases = data.get("phases")
    if not isinstance(phases, dict):
        return {}
    return {
        k: float(v)
        for k, v in phases.items()
        if k in PHASES and isinstance(v, int | float) and v >= 0
    }


def expected_builds(cache_root: Path, inputs: Any) -> dict[str, bool]:
    """Which phases will really build (True) or be found cached (False), where cheap to
    tell up front; phases left out are assumed to build until the builder says otherwise.

    Only the estimate depends on this, so a wrong guess costs accuracy, nothing else.
    """
    from criv.errors import FailedPrecondition
    from criv.guestimage import build, kernel, rootfs

    out: dict[str, bool] = {}
    # (the Debian kernel's cache key needs its package file, which may mean a download)
    if inputs.kernel == "criv" and build.cached_image(cache_root, inputs) is not None:
        return dict.fromkeys(PHASES, False)
    try:
        if inputs.kernel == "criv":
            khash = build.kernel_hash(inputs, kernel.source_version())
            out["kernel"] = not (cache_root / f"kernel-{khash}" / "vmlinux").is_file()
    except FailedPrecondition:
        pass  # the builder reports it with its own message
    mirror = inputs.mirror or rootfs.mirror_from_sources()
    base = cache_root / f"base-{build.base_hash(mirror)}" / "rootfs" / "usr/bin/python3"
    out["rootfs"] = not base.exists()
    return out


class BuildProgress:
    """A ``Progress`` callback for build_guest_image; use as a context manager."""

    def __init__(
        self,
        cache_root: Path,
        expected: dict[str, bool] | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache_root = cache_root
        self._console = console or Console(highlight=False, soft_wrap=True)
        self._clock = clock
        self._previous = load_timings(cache_root)
        self._builds = {p: True for p in PHASES} | (expected or {})
        self._durations: dict[str, float] = {}  # finished phases that really built
        self._cached: set[str] = set()
        self.phase = ""
        self._phase_start = 0.0
        self._start = 0.0
        self._live: Progress | None = None
        self._task = -1
        self.message = ""

    @property
    def tty(self) -> bool:
        return self._console.is_terminal and not self._console.is_dumb_terminal

    def __enter__(self) -> BuildProgress:
        self._start = self._phase_start = self._clock()
        if self.tty:
            self._live = Progress(
                SpinnerColumn(),
                _PhaseColumn(self),
                _BarColumn(self),
                _EtaColumn(self),
                TimeElapsedColumn(),
                console=self._console,
                transient=True,
            )
            self._live.start()
            self._task = self._live.add_task("guest image", total=None)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()
        if exc_type is None:
            self._finish_phase()
            self._save()
            total = fmt_duration(self._clock() - self._start)
            self._console.print(f"guest image: done in {total}", highlight=False)

    # -- the builder's callback ----------------------------------------------------------

    def __call__(self, line: str) -> None:
        prefix = line.split(":", 1)[0].strip()
        phase = _ALIASES.get(prefix, prefix)
        if phase in PHASES and phase != self.phase:
            self._finish_phase()
            self.phase, self._phase_start = phase, self._clock()
            self._phase_line()
        if phase in PHASES and line.startswith(f"{prefix}: cached"):
            self._cached.add(phase)
            self._builds[phase] = False
            if phase == "image":  # the whole image was found: nothing else builds
                self._builds = dict.fromkeys(PHASES, False)
        self.message = line
        if self._live is not None:
            self._live.console.print(line, highlight=False, markup=False)
            self._live.refresh()  # a new phase shows at once, not at the next tick
        else:
            stamp = fmt_duration(self._clock() - self._start)
            self._console.print(f"[{stamp:>6}] {line}", highlight=False, markup=False)

    def _finish_phase(self) -> None:
        if self.phase and self.phase not in self._cached and self.phase not in self._durations:
            self._durations[self.phase] = self._clock() - self._phase_start
            self._builds[self.phase] = False

    def _phase_line(self) -> None:
        if self._live is not None or not self._builds.get(self.phase, True):
            return  # the live display shows it; a phase expected cached says so itself
        last = self._previous.get(self.phase)
        took = f"last build took {fmt_duration(last)}" if last is not None else "no timing yet"
        left = self.remaining()
        eta = f"about {fmt_duration(left)} left in all" if left is not None else "no estimate"
        self._console.print(f"-- {self.phase}: {took}; {eta}", highlight=False, markup=False)

    # -- the estimate --------------------------------------------------------------------

    def remaining(self) -> float | None:
        """Seconds left by the last build's timings; None when a phase that still has to
        build has no timing (the first build on this machine)."""
        left = 0.0
        for p in PHASES:
            if p in self._durations or p in self._cached or not self._builds.get(p, True):
                continue
            est = self._previous.get(p)
            if est is None:
                return None
            if p == self.phase:
                est = max(0.0, est - (self._clock() - self._phase_start))
            left += est
        return left

    def fraction(self) -> float | None:
        """Share of the estimated work done, for the bar."""
        left = self.remaining()
        if left is None:
            return None
        done = sum(self._durations.values()) + (
            self._clock() - self._phase_start if self.phase not in self._cached else 0.0
        )
        return done / (done + left) if done + left > 0 else 1.0

    def _save(self) -> None:
        if not self._durations:
            return  # everything was cached: keep the timings of the build that made it
        merged = self._previous | {k: round(v, 1) for k, v in self._durations.items()}
        data = {"version": TIMINGS_VERSION, "phases": merged}
        try:
            write_atomic(self._cache_root / TIMINGS_FILE, (json.dumps(data) + "\n").encode(), 0o644)
        except OSError as e:
            self._console.print(f"(could not save build timings: {e})", highlight=False)


class _PhaseColumn(ProgressColumn):
    def __init__(self, bp: BuildProgress) -> None:
        super().__init__()
        self._bp = bp

    def render(self, task: Task) -> Text:
        return Text(f"guest image: {self._bp.phase or 'starting'}", style="bold")


class _BarColumn(ProgressColumn):
    def __init__(self, bp: BuildProgress) -> None:
        super().__init__()
        self._bp = bp

    def render(self, task: Task) -> ProgressBar:
        frac = self._bp.fraction()
        if frac is None:  # no estimate: a pulsing bar
            return ProgressBar(total=None, width=30, animation_time=task.get_time())
        return ProgressBar(total=1000, completed=int(frac * 1000), width=30)


class _EtaColumn(ProgressColumn):
    def __init__(self, bp: BuildProgress) -> None:
        super().__init__()
        self._bp = bp

    def render(self, task: Task) -> Text:
        left = self._bp.remaining()
        if left is None:
            return Text("no estimate yet (first build)", style="dim")
        return Text(f"~{fmt_duration(left)} left", style="cyan")
