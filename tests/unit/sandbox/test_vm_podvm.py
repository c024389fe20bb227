"""The agent's command line for a pod VM (criv/sandbox/vm/podvm.py)."""

from __future__ import annotations

from criv.config import VmConfig
from criv.sandbox.vm.podvm import fixed_helper_layout


def test_only_tcg_gets_fixed_helper_layout_and_the_config_can_turn_it_off() -> None:
    assert fixed_helper_layout(VmConfig(), "tcg")
    assert not fixed_helper_layout(VmConfig(), "kvm")  # nothing to translate
    assert not fixed_helper_layout(VmConfig(fixed_helper_layout=False), "tcg")
