"""ExecuTorch and ONNX export of the kit's models, each checked for parity with PyTorch."""
