"""ONNX graphs through onnx_ir, no torch-side planning: the node writer and layer translation
(``builder``, ``emit``), unique names (``names``), graph passes run by ``passes.run``
(``unfuse``: GRU/RNN into Scan for int8; ``batch_first``: Transposes for Triton), and whole
model walks (``walk``: op counts with subgraphs, topological order)."""
