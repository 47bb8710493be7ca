"""The build stage: a bundle's ONNX graphs -> engines, one per network, GPU target and runtime.

`plan` makes the build plan anywhere (no TensorRT, no GPU); `tensorrt` builds standard TensorRT
engines with the SageSLA AOT plugin on the target GPU.
"""
