"""Export to ONNX (and TensorRT / TensorRT-LLM on a GPU host), each export checked against PyTorch."""
