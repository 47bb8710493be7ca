"""The torch-free core every other part builds on: presets and configs, the SageSLA op contract,
the bundle and its manifest, the rCM schedule and noise, the tokenizer, video files, GPU probing.

Imports run one way: cli -> build / calibration / export -> plugins / models -> core, and the
runtime -> core. Nothing here imports torch, onnx or anything above it.
"""
