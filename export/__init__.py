"""ONNX export, FP16 / INT8 variants, TensorRT engines, runtimes, gates and latency (installed as edgekd.export)."""
