"""criv: a Kubernetes CRI v1 runtime in which every pod is a lightweight VM."""

__version__ = "0.1.0"
