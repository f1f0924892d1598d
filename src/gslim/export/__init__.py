"""Deployment artifacts: ONNX export and FP16 conversion (:mod:`.onnx`), parity checks
(:mod:`.parity`) and TensorRT engines (:mod:`.tensorrt`, which imports TensorRT lazily).

Submodules are imported on use, so ``import gslim.export`` costs nothing.
"""
