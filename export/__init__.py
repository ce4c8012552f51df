"""ONNX export, FP16 / INT8 variants, TensorRT engines, runtimes, gates and latency (installed as ``edgekd.export``).

The usual entry point is ``export_checkpoint`` (what ``edgekd export`` runs); the pieces are public for scripts:
``export_onnx`` -> ``convert_fp16`` / ``quantize_qdq`` -> ``parity_gate`` / ``task_gate`` -> ``build_engine``, with
``check_readiness`` for TensorRT, ``insightface_problems`` for insightface's loader, ``read_contract`` for the input an
ONNX file expects (edgekd metadata or insightface conventions) and ``load_runtime`` / ``open_runtime`` to run any
artifact. TensorRT and torch-tensorrt are imported only when a function needs them.
"""

from edgekd.export.contract import InputContract as InputContract
from edgekd.export.contract import read_contract as read_contract
from edgekd.export.fp16 import convert_fp16 as convert_fp16
from edgekd.export.gates import GateReport as GateReport
from edgekd.export.gates import parity_gate as parity_gate
from edgekd.export.gates import task_gate as task_gate
from edgekd.export.insightface import insightface_problems as insightface_problems
from edgekd.export.int8 import Int8Options as Int8Options
from edgekd.export.int8 import quantize_qdq as quantize_qdq
from edgekd.export.onnx import export_onnx as export_onnx
from edgekd.export.onnx import read_metadata as read_metadata
from edgekd.export.pipeline import ExportOptions as ExportOptions
from edgekd.export.pipeline import export_checkpoint as export_checkpoint
from edgekd.export.readiness import check_readiness as check_readiness
from edgekd.export.runtime import load_runtime as load_runtime
from edgekd.export.runtime import open_runtime as open_runtime
from edgekd.export.tensorrt import EngineProfile as EngineProfile
from edgekd.export.tensorrt import build_engine as build_engine
