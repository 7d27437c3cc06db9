"""Shoal's protobuf/gRPC APIs; generated modules are committed (``python -m shoal.api.generate``)."""
