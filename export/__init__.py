"""ONNX export, FP16 / INT8 variants, TensorRT engines, ExecuTorch programs, runtimes, gates and latency (installed as
``edgekd.export``).

The usual entry point is ``export_checkpoint`` (what ``edgekd export`` runs; ``ExportOptions(target="executorch")``
for a ``.pte``). The pieces are public for scripts, by concept: ``passes`` (``export_onnx`` -> ``convert_fp16`` /
``quantize_qdq``; ``PRECISION_TABLE`` says what each precision is), ``checks`` (``check_readiness`` for TensorRT,
``parity_gate`` / ``task_gate``, ``insightface_problems`` for insightface's loader), ``builders`` (``build_engine``,
``build_executorch_program``), ``runtimes`` (``open_runtime`` runs any artifact or checkpoint), ``artifact`` (the gated
write every route shares), and ``read_contract`` for the input an ONNX file expects (edgekd metadata or insightface
conventions). TensorRT, torch-tensorrt and ExecuTorch are imported only when a function needs them.
"""

import sys

from edgekd import CommandPackage
from edgekd.export.builders.executorch import build_executorch_program as build_executorch_program
from edgekd.export.builders.tensorrt import EngineProfile as EngineProfile
from edgekd.export.builders.tensorrt import build_engine as build_engine
from edgekd.export.checks.gates import GateReport as GateReport
from edgekd.export.checks.gates import parity_gate as parity_gate
from edgekd.export.checks.gates import task_gate as task_gate
from edgekd.export.checks.insightface import insightface_problems as insightface_problems
from edgekd.export.checks.readiness import check_readiness as check_readiness
from edgekd.export.contract import InputContract as InputContract
from edgekd.export.contract import read_contract as read_contract
from edgekd.export.options import ExportOptions as ExportOptions
from edgekd.export.passes.fp16 import convert_fp16 as convert_fp16
from edgekd.export.passes.int8 import Int8Options as Int8Options
from edgekd.export.passes.int8 import quantize_qdq as quantize_qdq
from edgekd.export.passes.onnx import export_onnx as export_onnx
from edgekd.export.passes.onnx import read_metadata as read_metadata
from edgekd.export.passes.precisions import PRECISION_TABLE as PRECISION_TABLE
from edgekd.export.pipeline import export_checkpoint as export_checkpoint
from edgekd.export.runtimes import BACKENDS as BACKENDS
from edgekd.export.runtimes import open_runtime as open_runtime

# Called, this package is the Python API's export (``from edgekd import export; export(ckpt, precision="int8")``).
sys.modules[__name__].__class__ = CommandPackage
