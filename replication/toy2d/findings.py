"""Sentences about the 2-D results, generated from the stages' metrics (never typed by hand).

``ma_verdict`` decides, by a stated rule, what the test-seed comparisons say about MA for one
backbone; ``family_evidence`` lays out a sweep family's numbers point by point; ``reflow_ma_answer``
puts them together into the answer to "does a principled setting make MA help vanilla reflow?".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Format = Callable[[Any], str]

#: the verdict rule of ``ma_verdict``, quoted in the report
VERDICT_RULE = ("MA helps when some Holm-corrected test at an in-design NFE says the MA student is better and "
                "none says it is worse; it hurts when some says worse and none better; mixed when both; "
                "otherwise no effect is shown (each untested cell is named)")


def three_digits(value: Any) -> str:
    """The default rendering: three significant digits; ``undefined`` for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "undefined"
    return f"{value:.3g}"


def ma_verdict(comparisons: Sequence[dict[str, Any]], comparison: str) -> str:
    """``helps`` / ``hurts`` / ``mixed`` / ``no effect shown`` for ``comparison`` (``treated - control``)
    by ``VERDICT_RULE`` over its in-design cells."""
    cells = [c for c in comparisons if c["comparison"] == comparison and not c.get("outside_design")]
    if not cells:
        raise ValueError(f"no in-design test cells for {comparison!r}")
    better = any(c.get("verdict") == "treated better" for c in cells)
    worse = any(c.get("verdict") == "treated worse" for c in cells)
    return {(True, False): "helps", (False, True): "hurts", (True, True): "mixed"}.get((better, worse),
                                                                                         "no effect shown")


def test_cells_sentence(comparisons: Sequence[dict[str, Any]], comparison: str, fmt: Format = three_digits) -> str:
    """Every cell of ``comparison``: metric, NFE, delta and its verdict (or why untested); numbers
    rendered by ``fmt``."""
    parts = []
    for c in comparisons:
        if c["comparison"] != comparison:
            continue
        mark = "*" if c.get("outside_design") else ""
        if c.get("p_value") is None:
            parts.append(f"{c['metric']}@{c['nfe']}{mark} {c['verdict']}")
        elif c["verdict"] == "no difference shown":
            parts.append(f"{c['metric']}@{c['nfe']}{mark} {fmt(c['delta'])} (not detected, MDE {fmt(c['mde'])})")
        else:
            parts.append(f"{c['metric']}@{c['nfe']}{mark} {fmt(c['delta'])} ({c['verdict']}, Holm p "
                         f"{fmt(c['p_holm'])})")
    return "; ".join(parts)


def family_evidence(family: dict[str, Any], nfes: Sequence[int], folded_nfe: int,
                    fmt: Format = three_digits) -> str:
    """Point by point (grid order, MA points): mean validation KL at ``nfes`` and the folded
    fraction at ``folded_nfe``."""
    rows = {(r["value"], r["nfe"]): r for r in family["rows"] if r["ma"]}
    parts = []
    for value in family["values"]:
        kls = " / ".join(fmt(rows[(value, n)]["kl"]) if (value, n) in rows else "–" for n in nfes)
        folded = rows.get((value, folded_nfe), {}).get("folded")
        parts.append(f"{value}: KL {kls}, folded {fmt(folded)}")
    label = " / ".join(str(n) for n in nfes)
    return (f"{family['parameter']} of {family['student']} (KL at {label} NFE, folded fraction at "
            f"{folded_nfe} NFE; {len(family['seeds'])} validation seeds): " + "; ".join(parts))


def reflow_ma_answer(test: dict[str, Any], weight_family: dict[str, Any], continuous_family: dict[str, Any],
                     comparison: str = "reflow_ma - reflow", fmt: Format = three_digits) -> list[str]:
    """The reflow + MA question answered from the numbers: the selected setting, its test verdict
    and every cell, and the sweep evidence of both families (the discrete log-det over lambda and the
    continuous log-det over sub-steps)."""
    nfes = sorted({r["nfe"] for r in weight_family["rows"]})
    chosen = next((s for s in test["selected"] if s["student"] == comparison.split(" - ")[0]), None)
    lines = []
    if chosen is not None:
        notes = [note for flag, note in ((chosen.get("on_grid_edge"), "at the edge of its grid"),
                                         (chosen.get("within_interval"), "the runner-up lies inside its interval"))
                 if flag]
        lines.append(f"Selected on the validation seeds: {chosen['parameter']} = {chosen['value']} from "
                     f"{chosen['grid']} ({chosen['criterion']})" + (f"; {', '.join(notes)}" if notes else "") + ".")
    lines.append(f"On the test seeds MA {ma_verdict(test['comparisons'], comparison)} ({comparison}: "
                 f"{test_cells_sentence(test['comparisons'], comparison, fmt)}; `*`: outside the design).")
    lines.append("Sweep, discrete log-det: " + family_evidence(weight_family, nfes, 1, fmt) + ".")
    lines.append("Sweep, continuous log-det: " + family_evidence(continuous_family, nfes, 1, fmt) + ".")
    return lines
