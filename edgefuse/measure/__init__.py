"""How a candidate is measured: runners (PyTorch, onnxruntime, CUDA), latency, memory, metrics, uncertainty."""
