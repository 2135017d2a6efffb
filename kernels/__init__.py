"""Providers, one module each: ``aten`` (every device's fallback, accepts every call),
``triton`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), ``ascend`` (torch_npu; CPU
tensors against a stand-in under ``XYSERVE_ASCEND_ON_CPU=1``). ``contract`` is what each provides.

Installed as ``xy_inductor.kernels``. The bottom of the import graph: a provider imports
neither the runtime nor another provider, and its heavy imports stay inside its module.
"""
