"""Checks of an export: TensorRT readiness of the graph (``readiness``), the parity and task gates against PyTorch
(``gates``) and loading through insightface (``insightface``). Output paths are checked by every command alike
(``edgekd.utils.out_paths``)."""
