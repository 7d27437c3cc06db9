"""Shoal: a sidecarless, per-node eBPF service mesh for Kubernetes."""

__version__ = "0.1.0"
