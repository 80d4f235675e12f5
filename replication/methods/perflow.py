"""Piecewise reflow (PeRFlow, Yan et al., 2024): K windows, window starts from noised data and the
teacher's window solve (online or from a window bank, as the tier decides)."""

from replication.common.methods import Method

METHOD = Method(
    name="perflow",
    pairing="windows",
    summary="PeRFlow: K windows, starts from noised data, teacher window solve, squared distance",
)
