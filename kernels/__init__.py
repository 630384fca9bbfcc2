"""Fused MeteoRA kernels (Pallas / Triton), one file per kernel, each with a pure-JAX reference.

Note: an unrelated Hugging Face package is also imported as `kernels`; transformers probes for it
(`tests/test_packaging.py` checks that ours does not confuse transformers or PEFT).
"""
