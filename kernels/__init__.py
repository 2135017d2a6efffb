"""What runs an xyserve op, and the types it consumes. Installed as ``xy_inductor.kernels``.

- The contract, at the bottom: ``contract.py`` (``Provider``, ``OpKernel``, ``Accept`` and the
  shared typed decisions), ``calls.py`` (one call object per op call), ``attention_plan.py``
  (token and task tables), ``gemm_plan.py`` (GEMM tiles and the SmoothGEMM planner).
- One provider per module or package, everything about it in one place: ``aten/`` (every
  device's fallback, accepts every call; its C++ CPU fast path ``aten/native.cpp``),
  ``triton/`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), ``ascend.py`` (torch_npu; CPU
  tensors against a stand-in under ``XYSERVE_ASCEND_ON_CPU=1``).

The bottom of the import graph: nothing here imports the runtime, and no provider imports
another; a provider's heavy imports (triton, torch_npu) stay behind its ``unavailable()``.
"""
