"""ONNX graph passes: PyTorch -> ONNX (``onnx``), and ONNX -> ONNX rewrites: an FP16-typed graph (``fp16``), an explicit
Q/DQ INT8 graph (``int8``) and the exact ONNX Runtime CPU rewrites (``ort_cpu``). Each takes and returns an
``onnx.ModelProto``; none of them writes a file or judges the result (that is ``edgekd.export.checks``).

``precisions`` is the table of export precisions: each one's pass from the FP32 graph, and the settings that the
checks, builders and pipeline read for it (its gate thresholds among them)."""
