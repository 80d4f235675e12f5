"""Classic reflow (Liu et al., ICLR 2023): one window, stored teacher pairs ``(x0, Phi^T(x0))``."""

from replication.common.methods import Method

METHOD = Method(
    name="reflow",
    pairing="teacher_pairs",
    windows=1,
    summary="reflow: K = 1 on a bank of teacher ODE pairs (x0, Phi^T(x0)), squared distance",
)
