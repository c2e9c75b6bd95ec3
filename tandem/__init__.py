"""Tandem: two-stage retrieval served over gRPC."""

__version__ = "0.1.0"
