"""Tandem serving core and gRPC server: no torch on this path."""
