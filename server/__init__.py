"""Tandem serving core and gRPC server: no torch on this path."""

# onnxruntime must be loaded before usearch: with usearch 2.26.6 loaded first, importing
# onnxruntime 1.32.0 segfaults in its pybind module (seen on this machine). Every server
# module is under this package, so this import runs before any of them loads usearch.
import onnxruntime  # noqa: F401
