"""Engine builders: TensorRT from the ONNX graph (``tensorrt``), or torch-tensorrt from the PyTorch model
(``torch_tensorrt``). Both need the ``trt`` extra and an NVIDIA GPU; ``edgekd.export.optional_deps`` imports them."""
