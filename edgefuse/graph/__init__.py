"""One graph per candidate: ONNX export checked against PyTorch, its FP16 and INT8 forms."""
