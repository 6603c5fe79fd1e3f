"""FLOP counts from XLA's cost analysis (benchmarks and experiments report rates with them)."""

from __future__ import annotations


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled XLA program; None where the backend has no cost analysis.

    XLA counts the body of a scanned loop once, not once per iteration: callers add such work
    analytically.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])
