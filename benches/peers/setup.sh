#!/usr/bin/env bash
# Makes the Python environment the peers bench runs ONNX Runtime and OpenVINO in:
# target/peers-venv (or $1) with onnxruntime, openvino, onnx and numpy from PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-target/peers-venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check onnxruntime openvino onnx numpy
"$venv/bin/python" -c 'import onnxruntime, openvino, onnx, numpy; print("onnxruntime", onnxruntime.__version__, "openvino", openvino.__version__, "numpy", numpy.__version__)'
