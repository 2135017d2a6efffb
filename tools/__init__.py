"""Developer tools run from the repository root (``python -m tools.<name>``); not installed with
the package. ``fuzz``: the differential fuzzer of the lowering (``make fuzz``)."""
