"""The libvirt side of VM pods (docs/vm.md). The only package that imports libvirt.

- :mod:`.domain`: domain XML objects (no policy), ``Domain.to_xml()``.
- :mod:`.spec`: policy, ``pod_domain(PodVm(...)) -> Domain`` (devices, cmdline, names).
- :mod:`.sizing`: ``vm_size(PodResources, defaults, host_cpus) -> VmSize``.
- :mod:`.driver`: ``Hypervisor`` (async: create, destroy, shutdown, lookup, list_domains,
  wait_stopped, add_stop_listener); imports libvirt, so it is not imported here.
- :mod:`.kvm`: ``choose_accel(...)``, the KVM probe with TCG fallback.
- :mod:`.hostsetup`: qemu.conf and starting libvirtd.
"""
