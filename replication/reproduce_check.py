"""Does the run in the working tree reproduce the committed results? One command that says so.

    python -m replication.reproduce_check [--against REF | --against-dir DIR] [--results results]
                                          [--json OUT] [--z 3] [--rtol 1e-6] [--error-ratio 2]

It compares every ``metrics.json`` (and the verdict sentences of every ``summary.md``) under the
results folder with the committed copy (``git show REF:path``, REF = HEAD by default; or the same
relative path under ``--against-dir``, a folder laid out like ``results/``), and says per file, per
table inside it (each top-level key) and per verdict: ``reproduced``, ``depends on the machine``,
``not reproduced``, ``not comparable`` or ``missing``, with the reason.

The rules, per value found at the same key path in both runs:

- **A number with a stated error** (a sibling ``K_se``, ``K_stderr``, ``K_paired_se``, ``K_std``, or
  a 95% half-width ``K_ci95`` / ``K_ci`` / ``K_half_width``; a bare ``ci95`` / ``se`` beside
  ``delta``) agrees when ``|a - b| <= z * sqrt(se_a**2 + se_b**2)``, ``z = 3`` by default. A
  half-width is turned into a standard error by dividing by the Student-t quantile
  ``t(0.975, n - 1)`` with ``n`` the sibling ``K_seeds`` or ``seeds`` (1.96 when no count is given).
  ``K_std`` (KID's spread over subsets) over-states the error of a mean: the check is lenient there.
- **The error bars themselves** are estimates: two runs' bars agree when their ratio is within
  ``--error-ratio`` (2).
- **A float without a stated error** agrees when ``|a - b| <= atol + rtol * max(|a|, |b|)``
  (``rtol = 1e-6``, ``atol = 1e-9``: a quantity that is zero up to rounding, the FID of a set with
  itself, is -1e-10 on one machine and -5e-12 on the next): a strict check, reported as "no stated error" so that a
  difference there is read as "differs in the last digits", not "disagrees beyond the noise".
  Bit-identical numbers are counted apart.
- **Integers, strings, booleans, counts** (floats named ``seeds``, ``*_seeds``, ``*_samples``, ...)
  **and the layout** (keys, rows, list lengths) must be equal; a difference means another
  experiment: ``not comparable``. A value present in one run and ``null`` in the other is ``not
  reproduced``.
- **Verdicts** (keys ``verdict``, ``verdict_*``, ``holds``, ``status``; in ``summary.md`` the
  per-NFE MA verdicts, the collapse sentence and the KL estimator check) are compared as words
  (numbers in parentheses, such as ``not detected (MDE 74.3)``, are dropped). A flipped verdict
  ``depends on the machine`` when every number with a stated error that decides it (its row's, or
  for a ``summary.md`` sentence the rows of ``metrics.json`` behind it) agrees within its error;
  else it is ``not reproduced``. The report also says whether the flip is within the test's power:
  the p-values straddle the level (``--alpha``, 0.05) and the effect lies inside its minimum
  detectable effect in a run.

Table rows (lists of objects) are matched by their labels (``comparison``, ``method``,
``student``, ``name``, ``metric``, ``seed``, ``nfe``, ``step``, ``window``), so a reordered table
still compares; a row in one run only is reported. A file in one run only is ``missing``. Other
result files (notebooks, figures, ``table.csv``, a rounded copy of the rows) are not compared.

Exit status: 0 when everything is reproduced, 1 when anything is not (including ``depends on the
machine``, ``not comparable`` and ``missing``), 2 for bad input (no results folder, unknown REF,
unreadable JSON), with a one-line message. ``--json OUT`` writes every comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: statuses, best first; a file's or table's status is the worst of its parts
STATUSES = ("reproduced", "depends on the machine", "not reproduced", "not comparable", "missing")
#: suffix of a sibling key holding the error of K, and what it is (longest suffixes tried first)
ERROR_SUFFIXES = {"_paired_se": "se", "_half_width": "half-width", "_stderr": "se", "_ci95": "half-width",
                  "_std": "se", "_se": "se", "_ci": "half-width"}
#: an error key without a prefix is the error of the first of these keys its object has
BARE_ERRORS = {"ci95": "half-width", "ci": "half-width", "half_width": "half-width", "se": "se", "stderr": "se"}
BARE_TARGETS = ("delta", "mean", "estimate", "value")
LABELS = ("comparison", "method", "student", "name", "metric", "seed", "nfe", "step", "window")
COUNT = re.compile(r"(^|_)(seeds|samples|images|entries|rows|steps|count|n)$|^n_")
Z95 = 1.959963984540054
FILES = ("metrics.json", "summary.md")
#: the comparison whose per-NFE verdicts the image tier's summary.md states
SUMMARY_COMPARISON = "perflow_ma - perflow"


class InputError(Exception):
    """Bad input: the message is the one line the command prints (exit status 2)."""


@dataclass(frozen=True)
class Rules:
    z: float = 3.0
    rtol: float = 1e-6
    atol: float = 1e-9
    error_ratio: float = 2.0
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name, low in (("z", 0.0), ("error_ratio", 1.0)):
            if not getattr(self, name) > low:
                raise InputError(f"--{name.replace('_', '-')} = {getattr(self, name)}: must be > {low:g}")
        for name in ("rtol", "atol"):
            if not getattr(self, name) >= 0:
                raise InputError(f"--{name} = {getattr(self, name)}: must be >= 0")
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha = {self.alpha}: must be in (0, 1)")


@dataclass
class Item:
    """One value compared: ``run`` (the working tree) against ``committed``."""
    path: str
    table: str
    kind: str      # "stated error", "no stated error", "error bar", "exact", "layout"
    outcome: str   # identical, within error, outside error, within tolerance, outside tolerance,
    #                within ratio, outside ratio, differs, null in one run, only in run, only in committed
    run: Any = None
    committed: Any = None
    se_run: float | None = None
    se_committed: float | None = None
    bound: float | None = None
    row: dict | None = None
    key: str = ""

    @property
    def status(self) -> str:
        if self.outcome in ("identical", "within error", "within tolerance", "within ratio"):
            return "reproduced"
        if self.kind in ("exact", "layout"):
            return "not comparable"
        return "not reproduced"

    @property
    def is_number(self) -> bool:
        return any(_num(v) for v in (self.run, self.committed))


@dataclass
class Verdict:
    where: str
    table: str
    run: Any
    committed: Any
    status: str
    why: str
    within_power: bool | None = None
    row: dict | None = None


@dataclass
class FileReport:
    file: str
    status: str = "reproduced"
    why: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)


# --- values -------------------------------------------------------------------------------------

def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _same(a: Any, b: Any) -> bool:
    if _num(a) and _num(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def _worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=STATUSES.index, default="reproduced")


def t_quantile(n: int | None) -> float:
    """``t(0.975, n - 1)``: a 95% half-width over ``n`` values is this many standard errors."""
    if n is None or n < 2:
        return Z95
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def error_keys(obj: dict) -> dict[str, tuple[str, str]]:
    """``{value key: (error key, "se" | "half-width")}`` for the values of ``obj`` with a stated error."""
    out: dict[str, tuple[str, str]] = {}
    for key in obj:
        for suffix in sorted(ERROR_SUFFIXES, key=len, reverse=True):
            if key.endswith(suffix) and key[: -len(suffix)] in obj:
                out.setdefault(key[: -len(suffix)], (key, ERROR_SUFFIXES[suffix]))
                break
        if key in BARE_ERRORS:
            target = next((t for t in BARE_TARGETS if t in obj), None)
            if target is not None:
                out.setdefault(target, (key, BARE_ERRORS[key]))
    return out


def standard_error(obj: dict, value_key: str, err: tuple[str, str] | None) -> float | None:
    """The standard error ``obj`` states for ``value_key`` (None when it states none)."""
    if err is None or err[0] not in obj:
        return None
    raw = obj[err[0]]
    if isinstance(raw, list) and len(raw) == 2 and all(_num(v) for v in raw):
        raw = abs(raw[1] - raw[0]) / 2  # an interval [low, high]
    if not _num(raw) or math.isnan(raw):
        return None
    if err[1] == "se":
        return abs(float(raw))
    n = obj.get(f"{value_key}_seeds", obj.get("seeds", obj.get("n")))
    return abs(float(raw)) / t_quantile(int(n) if _num(n) and not math.isnan(n) else None)


def is_verdict(key: str) -> bool:
    return key in ("verdict", "holds", "status") or key.startswith("verdict_")


def verdict_words(value: Any) -> Any:
    """A verdict without its numbers: ``not detected (MDE 74.3)`` -> ``not detected``."""
    if isinstance(value, str):
        return re.sub(r"\s*\([^)]*\d[^)]*\)", "", value).strip()
    return value


def _label(row: dict) -> dict:
    return {k: row[k] for k in LABELS if k in row and not isinstance(row[k], dict | list)}


def _label_text(label: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in label.items())


# --- walking two JSON documents -----------------------------------------------------------------

class _Walk:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.items: list[Item] = []
        self.verdicts: list[Verdict] = []

    def value(self, path: str, table: str, key: str, a: Any, b: Any, se_a: float | None,
              se_b: float | None, row: dict | None) -> Item:
        r = self.rules
        counted = COUNT.search(key) is not None or table == "counts"
        floats = [x for x in (a, b) if _num(x)]
        measured = (not counted and any(isinstance(x, float) for x in floats)
                    and all(_num(x) or x is None for x in (a, b)))
        stated = se_a is not None or se_b is not None
        kind = ("stated error" if stated else "no stated error") if measured else "exact"
        item = Item(path, table, kind, "identical", a, b, se_a, se_b, row=row, key=key)
        if _same(a, b):
            pass
        elif kind == "exact":
            item.outcome = "differs"
        elif a is None or b is None:
            item.outcome = "null in one run"
        elif stated:
            item.bound = r.z * math.sqrt((se_a or 0.0) ** 2 + (se_b or 0.0) ** 2)
            item.outcome = "within error" if abs(a - b) <= item.bound else "outside error"
        else:
            item.bound = r.atol + r.rtol * max(abs(a), abs(b))
            item.outcome = "within tolerance" if abs(a - b) <= item.bound else "outside tolerance"
        self.items.append(item)
        return item

    def error_bar(self, path: str, table: str, key: str, a: Any, b: Any, row: dict | None) -> Item:
        item = Item(path, table, "error bar", "identical", a, b, row=row, key=key)
        if isinstance(a, list) and isinstance(b, list):
            a = abs(a[1] - a[0]) if len(a) == 2 and all(_num(v) for v in a) else a
            b = abs(b[1] - b[0]) if len(b) == 2 and all(_num(v) for v in b) else b
        if _same(a, b):
            pass
        elif a is None or b is None:
            item.outcome = "null in one run"
        elif _num(a) and _num(b):
            lo, hi = sorted((abs(a), abs(b)))
            item.bound = self.rules.error_ratio
            item.outcome = "within ratio" if lo > 0 and hi / lo <= self.rules.error_ratio else "outside ratio"
        else:
            item.kind, item.outcome = "layout", "differs"
        self.items.append(item)
        return item

    def layout(self, path: str, table: str, outcome: str, a: Any = None, b: Any = None,
               row: dict | None = None) -> None:
        self.items.append(Item(path, table, "layout", outcome, a, b, row=row))

    def any(self, path: str, table: str, key: str, a: Any, b: Any, row: dict | None,
            se: tuple[float | None, float | None] = (None, None)) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            self.obj(path, table, a, b, row)
        elif isinstance(a, list) and isinstance(b, list):
            self.array(path, table, key, a, b, row)
        elif isinstance(a, dict | list) or isinstance(b, dict | list):
            self.layout(path, table, "differs", type(a).__name__, type(b).__name__, row)
        else:
            self.value(path, table, key, a, b, *se, row)

    def obj(self, path: str, table: str, a: dict, b: dict, row: dict | None) -> None:
        errs = {**error_keys(b), **error_keys(a)}
        bars = {e for e, _ in errs.values()}
        local: list[Item] = []
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else key
            tab = table or (key if isinstance(a.get(key, b.get(key)), dict | list) else "(top level)")
            if key not in a or key not in b:
                self.layout(sub, tab, "only in committed" if key not in a else "only in run", row=row)
            elif is_verdict(key):
                continue
            elif key in bars:
                local.append(self.error_bar(sub, tab, key, a[key], b[key], row))
            else:
                start = len(self.items)
                se = (standard_error(a, key, errs.get(key)), standard_error(b, key, errs.get(key)))
                self.any(sub, tab, key, a[key], b[key], row, se)
                local.extend(self.items[start:])
        for key in sorted(k for k in set(a) & set(b) if is_verdict(k)):
            self.verdict(f"{path}.{key}" if path else key, table or "(top level)", key, a, b, local, row)

    def array(self, path: str, table: str, key: str, a: list, b: list, row: dict | None) -> None:
        if a and b and all(isinstance(r, dict) for r in a + b):
            la, lb = [tuple(_label(r).items()) for r in a], [tuple(_label(r).items()) for r in b]
            if len(set(la)) == len(la) and len(set(lb)) == len(lb) and any(la):
                pairs = dict(zip(lb, b, strict=True))
                for lab, ra in zip(la, a, strict=True):
                    sub = f"{path}[{_label_text(dict(lab))}]"
                    if lab in pairs:
                        self.obj(sub, table, ra, pairs.pop(lab), dict(lab))
                    else:
                        self.layout(sub, table, "only in run", row=dict(lab))
                for lab in pairs:
                    sub = f"{path}[{_label_text(dict(lab))}]"
                    self.layout(sub, table, "only in committed", row=dict(lab))
                return
        if len(a) != len(b):
            self.layout(f"{path}[]", table, "differs", f"{len(a)} entries", f"{len(b)} entries", row)
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            self.any(f"{path}[{i}]", table, key, x, y, row)

    def verdict(self, path: str, table: str, key: str, a: dict, b: dict, siblings: list[Item],
                row: dict | None) -> None:
        va, vb = verdict_words(a[key]), verdict_words(b[key])
        if _same(va, vb):
            self.verdicts.append(Verdict(path, table, a[key], b[key], "reproduced", "same verdict", row=row))
            return
        status, why = judge_flip(siblings)
        power, power_why = test_power(key, a, b, self.rules.alpha)
        self.verdicts.append(Verdict(path, table, a[key], b[key], status, f"{why}; {power_why}", power, row))


def judge_flip(deciding: list[Item]) -> tuple[str, str]:
    """A flipped verdict: ``depends on the machine`` when every number with a stated error that
    decides it agrees within its error, else ``not reproduced``."""
    stated = [i for i in deciding if i.kind == "stated error"]
    off = [i for i in stated if i.status != "reproduced"]
    if not stated:
        return "not reproduced", ("no number behind it carries a stated error, so the flip cannot be "
                                  "put down to noise")
    if off:
        return "not reproduced", "numbers behind it disagree beyond their errors: " + ", ".join(
            _item_text(i) for i in off[:3])
    shown = ", ".join(f"{i.path}: bit-identical" if i.outcome == "identical" else _item_text(i)
                      for i in stated if i.key in ("delta", "kl", "kl_refined"))
    return "depends on the machine", (f"the {len(stated)} number(s) with a stated error behind it agree "
                                      f"within their errors" + (f" ({shown})" if shown else ""))


def test_power(key: str, a: dict, b: dict, alpha: float) -> tuple[bool | None, str]:
    """Whether a flip is within the test's power: its p-values straddle the level, and the effect
    lies inside the minimum detectable effect (``mde``) in at least one run."""
    p_key = "p_holm" if key == "verdict_holm" else "p_value"
    parts, straddle, inside = [], None, None
    pa, pb = a.get(p_key), b.get(p_key)
    if _num(pa) and _num(pb):
        straddle = (pa <= alpha) != (pb <= alpha)
        parts.append(f"{p_key} {pa:.3g} (run) vs {pb:.3g} (committed) "
                     f"{'straddle' if straddle else 'lie on one side of'} the level {alpha:g}")
    elif _num(a.get("delta")) and _num(b.get("delta")) and _num(a.get("ci95")) and _num(b.get("ci95")):
        straddle = (abs(a["delta"]) <= a["ci95"]) != (abs(b["delta"]) <= b["ci95"])
        parts.append(f"|delta| against the 95% half-width: {abs(a['delta']):.3g} vs {a['ci95']:.3g} (run), "
                     f"{abs(b['delta']):.3g} vs {b['ci95']:.3g} (committed)")
    for side, obj in (("run", a), ("committed", b)):
        if _num(obj.get("mde")) and _num(obj.get("delta")):
            here = abs(obj["delta"]) < obj["mde"]
            inside = bool(inside) or here
            parts.append(f"|delta| {abs(obj['delta']):.3g} {'<' if here else '>='} MDE {obj['mde']:.3g} ({side})")
    known = [v for v in (straddle, inside) if v is not None]
    power = all(known) if known else None
    head = {True: "within the test's power (a rerun can land on either side)",
            False: "not explained by the test's power", None: "the test's power is not stated"}[power]
    return power, head + (": " + "; ".join(parts) if parts else "")


def _item_text(i: Item) -> str:
    run, committed = _fmt(i.run), _fmt(i.committed)
    if run == committed:   # equal to 6 digits: show every digit
        run, committed = repr(i.run), repr(i.committed)
    text = f"{i.path}: {run} (run) vs {committed} (committed)"
    if i.bound is not None and i.kind == "stated error":
        text += f", |diff| {abs(i.run - i.committed):.3g} vs bound {i.bound:.3g}"
    elif i.bound is not None and i.kind == "no stated error":
        text += f", no stated error, |diff| {abs(i.run - i.committed):.3g} > {i.bound:.3g}"
    elif i.bound is not None and i.kind == "error bar":
        text += f", error bar ratio beyond {i.bound:g}"
    return text


def _fmt(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else repr(x)


# --- summary.md verdicts ------------------------------------------------------------------------

_MA = re.compile(r"^- (\d+) NFE: \*\*(.+?)\*\*", re.M)
_COLLAPSE = re.compile(r"^(\S+) (?:collapses at ([\d, ]+) NFE|does not collapse at any NFE)", re.M)
_ESTIMATOR = re.compile(r"with (\d+)(?: RK4)? steps, (within \d+ standard errors of 0|[\d.]+ standard errors from 0)")


def summary_verdicts(text: str) -> dict[str, tuple[Any, Callable[[Item], bool] | None, dict]]:
    """The verdicts of a ``summary.md``: ``{name: (verdict, which metrics.json items decide it, info)}``."""
    out: dict[str, tuple[Any, Callable[[Item], bool] | None, dict]] = {}
    for m in _MA.finditer(text):
        out[f"MA verdict at {m[1]} NFE"] = (m[2], None, {"nfe": int(m[1])})
    for m in _COLLAPSE.finditer(text):
        nfes = tuple(int(n) for n in m[2].replace(" ", "").split(",")) if m[2] else ()
        out[f"{m[1]} collapses at NFE"] = (nfes, None, {"method": m[1]})
    for i, m in enumerate(_ESTIMATOR.finditer(text)):
        key = "kl" if i == 0 else "kl_refined"
        words = m[2] if m[2].startswith("within") else "not within 2 standard errors of 0"
        out[f"KL estimator check ({m[1]} steps)"] = (words, lambda it, key=key: (
            it.table == "rows" and it.key == key and (it.row or {}).get("method") == "teacher (CNF)"), {})
    return out


def _behind_collapse(method: str, nfes: set[int]) -> Callable[[Item], bool]:
    """The ``summary`` numbers that decide whether ``method`` collapses at ``nfes``."""
    def pick(it: Item) -> bool:
        row = it.row or {}
        return (it.table == "summary" and row.get("method") == method and row.get("nfe") in nfes
                and it.key in ("domain_recall_teacher", "class_coverage"))

    return pick


def compare_summary(rel: str, run: str, committed: str, metrics: FileReport | None) -> FileReport:
    report = FileReport(rel)
    va, vb = summary_verdicts(run), summary_verdicts(committed)
    if not va and not vb:
        report.why.append("no verdict sentence found on either side (nothing judged)")
    for name in sorted(set(va) | set(vb)):
        if name not in va or name not in vb:
            a, b = va.get(name, (None,))[0], vb.get(name, (None,))[0]
            side = "the run" if name in va else "the committed results"
            report.verdicts.append(Verdict(name, "verdicts", a, b, "not comparable", f"only in {side}"))
            continue
        (a, decide, info), (b, _, _) = va[name], vb[name]
        if _same(a, b):
            report.verdicts.append(Verdict(name, "verdicts", a, b, "reproduced", "same verdict"))
            continue
        if metrics is None:
            report.verdicts.append(Verdict(name, "verdicts", a, b, "not reproduced",
                                           "no metrics.json beside it to judge the flip"))
            continue
        if "nfe" in info:   # the per-NFE MA verdict follows from the per-test verdicts at that NFE
            behind = [v for v in metrics.verdicts
                      if v.table == "paired_tests_holm" and v.status != "reproduced"
                      and (v.row or {}).get("nfe") == info["nfe"] and v.where.endswith(".verdict_holm")
                      and (v.row or {}).get("comparison", SUMMARY_COMPARISON) == SUMMARY_COMPARISON]
            if not behind:
                status, why, power = "not reproduced", "no per-test verdict in metrics.json flips with it", None
            else:
                status = _worst(v.status for v in behind)
                powers = [v.within_power for v in behind]
                power = None if None in powers else all(powers)
                why = "follows the flipped test(s) " + "; ".join(f"{v.where}: {v.why}" for v in behind)
        else:
            if decide is None:   # collapse: the recall / least-class share of the NFEs that differ
                decide = _behind_collapse(info["method"], set(a) ^ set(b))
            status, why = judge_flip([i for i in metrics.items if decide(i)])
            power = None
        report.verdicts.append(Verdict(name, "verdicts", a, b, status, why, power))
    return report


# --- files --------------------------------------------------------------------------------------

def compare_metrics(rel: str, run: Any, committed: Any, rules: Rules) -> FileReport:
    walk = _Walk(rules)
    walk.any("", "" if isinstance(run, dict) and isinstance(committed, dict) else "(top level)", "",
             run, committed, None)
    return FileReport(rel, items=walk.items, verdicts=walk.verdicts)


def _tables(report: FileReport) -> dict[str, dict]:
    names = sorted({i.table for i in report.items} | {v.table for v in report.verdicts})
    return {t: summarize([i for i in report.items if i.table == t],
                         [v for v in report.verdicts if v.table == t]) for t in names}


def summarize(items: list[Item], verdicts: list[Verdict]) -> dict:
    """Counts, status and the reasons of one table (or one file)."""
    nums = [i for i in items if i.is_number]
    c = {"numbers": len(nums),
         "identical": sum(i.outcome == "identical" for i in nums),
         "with error": sum(i.kind == "stated error" for i in nums),
         "within error": sum(i.outcome == "within error" for i in nums),
         "outside error": sum(i.outcome == "outside error" for i in nums),
         "no stated error": sum(i.kind == "no stated error" for i in nums),
         "no stated error, differs": sum(i.outcome == "outside tolerance" for i in nums),
         "error bars off": sum(i.kind == "error bar" and i.status != "reproduced" for i in items),
         "layout or counts differ": sum(i.status == "not comparable" for i in items),
         "null in one run": sum(i.outcome == "null in one run" for i in items if i.kind != "error bar"),
         "verdicts": len(verdicts),
         "verdicts flipped": sum(v.status != "reproduced" for v in verdicts)}
    status = _worst([i.status for i in items] + [v.status for v in verdicts])
    why = []
    groups: tuple[tuple[Callable[[Item], bool], str], ...] = (
        (lambda i: i.status == "not comparable", "differ in layout, labels or counts (another experiment)"),
        (lambda i: i.outcome == "outside error", "outside their stated error"),
        (lambda i: i.outcome == "outside tolerance", "without a stated error differ (strict check)"),
        (lambda i: i.kind == "error bar" and i.status != "reproduced",
         "error bars differ by more than the ratio allowed"),
        (lambda i: i.outcome == "null in one run" and i.kind != "error bar", "are null in one run only"))
    for pick, text in groups:
        hit = [i for i in items if pick(i)]
        if hit:
            why.append(f"{len(hit)} value(s) {text}, first: {_item_text(hit[0])}")
    for v in verdicts:
        if v.status != "reproduced":
            why.append(f"verdict {v.where}: {_fmt(v.committed)} (committed) -> {_fmt(v.run)} (run): "
                       f"{v.status}; {v.why}")
    if not why:
        parts = [f"{c['identical']} of {c['numbers']} numbers bit-identical"] if c["numbers"] else []
        if c["with error"]:
            parts.append(f"{c['with error']} carry a stated error ({c['within error']} differ within it)")
        if c["no stated error"]:
            parts.append(f"{c['no stated error']} carry no stated error (checked to the relative tolerance)")
        if verdicts:
            parts.append(f"{len(verdicts)} verdict(s) the same")
        if parts:
            why.append("; ".join(parts))
    return {"status": status, "counts": c, "why": why}


@dataclass
class Side:
    """The result files of one run: ``{path relative to the results folder: text}``."""
    name: str
    files: dict[str, str]


NO_RESULTS = "no such folder (run from the repository root, or pass --results)"


def _result_files(root: Path) -> dict[str, str]:
    """``metrics.json`` and ``summary.md`` below ``root``, hidden folders (``.failed``) left out."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.name in FILES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def working_tree(results: Path) -> Side:
    if not results.is_dir():
        raise InputError(f"--results {results}: {NO_RESULTS}")
    return Side(f"{results} (working tree)", _result_files(results))


def folder(path: Path) -> Side:
    if not path.is_dir():
        raise InputError(f"--against-dir {path}: no such folder")
    return Side(str(path), _result_files(path))


def git_ref(results: Path, ref: str) -> Side:
    def git(*args: str, cwd: Path = results) -> str:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
        if proc.returncode:
            raise InputError(f"git {' '.join(args)}: {proc.stderr.strip() or 'failed'}")
        return proc.stdout

    if not results.is_dir():
        raise InputError(f"--results {results}: {NO_RESULTS}")
    try:
        top = Path(git("rev-parse", "--show-toplevel").strip())
    except InputError:
        raise InputError(f"--results {results}: not inside a git repository; compare with a folder "
                         f"of committed copies with --against-dir DIR") from None
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").strip()
    except InputError:
        raise InputError(f"--against {ref}: not a commit of the git repository {top}") from None
    prefix = results.resolve().relative_to(top.resolve()).as_posix()
    listed = git("ls-tree", "-r", "--full-name", "--name-only", commit, "--", prefix, cwd=top)
    names = [n for n in listed.splitlines()
             if Path(n).name in FILES and not any(part.startswith(".") for part in Path(n).parts)]
    files = {str(Path(n).relative_to(prefix)): git("show", f"{commit}:{n}", cwd=top) for n in names}
    return Side(f"{ref} ({commit[:7]})", files)


def _parse(side: Side, rel: str) -> Any:
    try:
        return json.loads(side.files[rel])
    except json.JSONDecodeError as err:
        raise InputError(f"{rel} in {side.name}: not valid JSON ({err})") from None


def compare(run: Side, committed: Side, rules: Rules) -> list[FileReport]:
    """Every result file of either side, compared; the metrics.json of a folder before its summary.md."""
    names = sorted(set(run.files) | set(committed.files), key=lambda n: (str(Path(n).parent), n))
    if not names:
        raise InputError(f"no metrics.json or summary.md under {run.name} nor {committed.name}")
    reports: dict[str, FileReport] = {}
    for rel in names:
        if rel not in run.files or rel not in committed.files:
            where = "the run (working tree)" if rel not in run.files else "the committed results"
            reports[rel] = FileReport(rel, "missing", [f"missing in {where}"])
            continue
        if rel.endswith(".json"):
            report = compare_metrics(rel, _parse(run, rel), _parse(committed, rel), rules)
        else:
            beside = reports.get(str(Path(rel).with_name("metrics.json")))
            report = compare_summary(rel, run.files[rel], committed.files[rel],
                                     beside if beside is not None and beside.status != "missing" else None)
        whole = summarize(report.items, report.verdicts)
        report.status, report.why = whole["status"], report.why + whole["why"]
        reports[rel] = report
    return list(reports.values())


# --- output -------------------------------------------------------------------------------------

_COLUMNS = (("numbers", "numbers"), ("identical", "identical"), ("with err", "with error"),
            ("within err", "within error"),
            ("outside err", "outside error"), ("no-err", "no stated error"),
            ("no-err differs", "no stated error, differs"), ("other", None), ("verdicts", None))


def _row(name: str, counts: dict | None, status: str) -> list[str]:
    if counts is None:
        return [name] + ["-"] * len(_COLUMNS) + [status]
    other = counts["error bars off"] + counts["layout or counts differ"] + counts["null in one run"]
    cells = [str(counts[k]) if k else "" for _, k in _COLUMNS[:-2]]
    verdicts = "-"
    if counts["verdicts"]:
        flipped = counts["verdicts flipped"]
        verdicts = f"{counts['verdicts'] - flipped} same" + (f", {flipped} flipped" if flipped else "")
    return [name, *cells, str(other), verdicts, status]


def render(reports: list[FileReport], run: Side, committed: Side, rules: Rules) -> str:
    lines = [f"run: {run.name}", f"committed: {committed.name}",
             f"rules: stated error |a-b| <= {rules.z:g}*sqrt(se_a^2+se_b^2); no stated error "
             f"|a-b| <= {rules.atol:g} + {rules.rtol:g}*max(|a|,|b|) (strict); error bars within a "
             f"ratio of {rules.error_ratio:g}; counts, labels and layout equal; verdict level "
             f"{rules.alpha:g}", ""]
    table = [["file / table", *(h for h, _ in _COLUMNS), "status"]]
    for r in reports:
        if r.status == "missing":
            table.append(_row(r.file, None, "missing"))
            continue
        table.append(_row(r.file, summarize(r.items, r.verdicts)["counts"], r.status))
        tables = _tables(r)
        if len(tables) > 1:
            table += [_row(f"  {t}", s["counts"], s["status"]) for t, s in tables.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for r in reports:
        lines.append(f"{r.file}: {r.status}")
        lines += [f"  - {w}" for w in r.why]
    overall = _worst(r.status for r in reports)
    off = sum(r.status != "reproduced" for r in reports)
    lines += ["", f"overall: {overall}" + (f" ({off} of {len(reports)} files)" if off else "")]
    return "\n".join(lines)


def as_json(reports: list[FileReport], run: Side, committed: Side, rules: Rules) -> dict:
    return {"run": run.name, "committed": committed.name, "rules": asdict(rules),
            "overall": _worst(r.status for r in reports),
            "files": [{"file": r.file, "status": r.status, "why": r.why,
                       "counts": summarize(r.items, r.verdicts)["counts"],
                       "tables": _tables(r),
                       "verdicts": [asdict(v) for v in r.verdicts],
                       "values": [asdict(i) | {"status": i.status} for i in r.items]} for r in reports]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    add = parser.add_argument
    which.add_argument("--against", default="HEAD", metavar="REF", help="the git commit to compare with (HEAD)")
    which.add_argument("--against-dir", type=Path, metavar="DIR", help="a folder laid out like results/")
    add("--results", type=Path, default=Path("results"), help="the run's results folder (results)")
    add("--json", type=Path, metavar="OUT", help="write the whole comparison here")
    add("--z", type=float, default=Rules.z, help="stated errors: agree within z combined SE (3)")
    add("--rtol", type=float, default=Rules.rtol, help="no stated error: relative tolerance (1e-6)")
    add("--atol", type=float, default=Rules.atol, help="no stated error: absolute tolerance (1e-9)")
    add("--error-ratio", type=float, default=Rules.error_ratio, help="error bars agree within this ratio (2)")
    add("--alpha", type=float, default=Rules.alpha, help="the verdict tests' level (0.05)")
    args = parser.parse_args(argv)
    try:
        rules = Rules(args.z, args.rtol, args.atol, args.error_ratio, args.alpha)
        run = working_tree(args.results)
        committed = (folder(args.against_dir) if args.against_dir is not None
                     else git_ref(args.results, args.against))
        reports = compare(run, committed, rules)
    except InputError as err:
        print(f"reproduce_check: {err}", file=sys.stderr)
        return 2
    print(render(reports, run, committed, rules))
    if args.json is not None:
        doc = as_json(reports, run, committed, rules)
        args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0 if all(r.status == "reproduced" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
