"""The single version string, also written into ONNX metadata and every JSON report."""

__version__ = "0.1.0"
