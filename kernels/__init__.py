"""Triton kernels, each beside its torch reference (exl3_ref.py). Import the module you need; nothing loads here.

hadamard.py (block-128 Hadamard), exl3_reconstruct.py (trellis decode, dense W), exl3_matmul.py (EXL3 linear).
"""
