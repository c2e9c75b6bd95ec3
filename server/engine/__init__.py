"""The engine every transport calls: requests, search, rerank, writes, and their threads."""

# onnxruntime must be loaded before usearch: with usearch 2.26.6 loaded first, importing
# onnxruntime 1.32.0 segfaults in its pybind module (seen on this machine). The vector index
# is in this package, so this import runs before anything loads usearch through it.
import onnxruntime  # noqa: F401
