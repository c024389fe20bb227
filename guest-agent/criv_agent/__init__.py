"""criv-agent: runs one pod's containers with crun and answers criv's agent API."""

__version__ = "0.1.0"
API_VERSION = 1
