"""ExecSync, CRI logs, OOM and stop timeouts, end to end through criv."""

from __future__ import annotations

import pytest

from tests.support import scenarios
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_exec_sync_codes_deadline_and_cap(cri: Cri) -> None:
    scenarios.exec_sync_codes_deadline_and_cap(cri)


@pytest.mark.timeout(120)
def test_log_format_partial_lines_and_reopen(cri: Cri) -> None:
    scenarios.log_format_partial_lines_and_reopen(cri)


@pytest.mark.timeout(120)
def test_oom_killed_and_stop_timeout(cri: Cri) -> None:
    scenarios.oom_killed_and_stop_timeout(cri)
