"""Checks of an export: TensorRT readiness of the graph (``readiness``), the parity and task gates against PyTorch
(``gates``), loading through insightface (``insightface``) and the writability of the outputs (``outputs``)."""
