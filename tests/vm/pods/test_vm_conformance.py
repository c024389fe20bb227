"""Exec identity, the log file at StartContainer and ExecSync's timeout in a vm pod: one
VM for all of them (the same scenario runs in host mode in
tests/integration/runtime/test_runtime_conformance.py)."""

from __future__ import annotations

import pytest

from tests.support import conformance
from tests.support.cri import Cri

pytestmark = pytest.mark.vm


@pytest.mark.timeout(900)
def test_vm_exec_identity_log_file_and_exec_timeout(vm_cri: Cri) -> None:
    conformance.exec_identity_log_file_and_exec_timeout(vm_cri)
