"""Export for phones: ExecuTorch ``.pte`` (inference and on-device training) and ONNX.

Modules::

    programs.py    the exported modules: static-shape inference, slot-based training programs
    executorch.py  .pte export/lowering (XNNPACK or portable kernels), training programs
    onnx.py        ONNX export, checker, onnxruntime parity
    runtime.py     ExecuTorchTrainer: SGD in the ExecuTorch runtime, canonical deltas
    cli.py         ``hfedmoe export {pte,onnx,train-pte}``

executorch, onnx and onnxruntime are imported inside functions only.
"""
