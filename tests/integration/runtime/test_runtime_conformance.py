"""Exec identity, the log file at StartContainer and ExecSync's timeout, in host mode
(the same scenario runs in vm mode in tests/vm/pods/test_vm_conformance.py)."""

from __future__ import annotations

import pytest

from tests.support import conformance
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_exec_identity_log_file_and_exec_timeout(cri: Cri) -> None:
    conformance.exec_identity_log_file_and_exec_timeout(cri)
