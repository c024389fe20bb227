"""The splice forwarder, shared with the guest: one copy, in the agent package (the guest
image carries criv_agent but not criv)."""

from criv_agent.vsock_splice import CHUNK, PIPE_SIZE, Forwarder, join, pump

__all__ = ["CHUNK", "PIPE_SIZE", "Forwarder", "join", "pump"]
