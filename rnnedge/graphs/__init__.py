"""ONNX graph building and graph passes (onnx / onnx_ir); no torch-side planning."""
