"""Quantization math on tensors: grids and packing, LDLQ/Hadamard rounding, CALDERA Q + L·R decomposition, Hessians."""
