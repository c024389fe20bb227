"""The agent's helpers without ASLR (criv_agent/fixedlayout.py): the flag is set on the
agent and inherited by what it runs, and the default persona (what crun sets from the
spec's linux.personality) clears it again. When criv passes the flag:
tests/unit/sandbox/test_vm_podvm.py."""

from __future__ import annotations

import subprocess
import sys

from criv_agent.fixedlayout import ADDR_NO_RANDOMIZE

# in a child of its own: the flag would otherwise stay on the test process
CHILD = """
import ctypes, subprocess
from criv_agent.fixedlayout import fix_helper_layout
persona = fix_helper_layout()
helper = subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True)
libc = ctypes.CDLL(None)
libc.personality(0)  # what crun does with linux.personality LINUX
container = subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True)
print(persona, helper.stdout.strip(), container.stdout.strip())
"""


def test_helpers_inherit_no_aslr_and_the_default_persona_clears_it() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    persona, helper, container = out.stdout.split()
    assert int(persona) & ADDR_NO_RANDOMIZE
    assert int(helper, 16) & ADDR_NO_RANDOMIZE
    assert int(container, 16) == 0
