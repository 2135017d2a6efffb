"""Providers, one module each: ``cpu`` (ATen, the fallback that accepts every call).

Installed as ``xy_inductor.kernels``. A provider's heavy imports stay inside its module.
"""
