"""SageSLA: the block-sparse low-bit attention core as an op contract, Triton kernels and a TensorRT plugin."""
