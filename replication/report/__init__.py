"""The comparison report: every tier's numbers beside the published ones, the abstract's claims
checked by written rules, and the flat headline metrics that ``dvc metrics show`` / ``diff`` read.

The report tier trains nothing and computes no new number: it reads the other stages' metrics files
(``inputs``), flattens their headline numbers (``headline``), decides each claim of ``paper.yaml``
from those numbers by the rules of ``claims``, and writes ``REPORT.md`` (``build``), every number of
which is checked to come from an input (``numbers.check_provenance``).
"""
