"""The packed runtime: CompressedLinear, the packed matmul and its kernels, the transformers quantizer."""
