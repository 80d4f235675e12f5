"""The ``report`` params section: which numbers are headline, and the thresholds of the claims' rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import check_name_list, check_nfe_list, require


@dataclass
class ReportConfig:
    """``nfe``: the step counts whose numbers go into ``headline.json``; ``toy2d_metrics``: columns
    of the 2-D tables flattened (each with its standard error or half-width); ``images_metrics``:
    columns of the image summary flattened (mean, 95% half-width, seeds) and the metrics whose paired
    deltas are flattened; ``lower_is_better`` / ``higher_is_better``: the quality metrics of the
    claims' rules, by the direction that is better; ``ma_comparisons``: the paired comparisons
    ``"A - B"`` that are "B with MA minus B"; ``alpha``: the level a Holm-corrected p-value must beat; ``z``: how many combined
    standard errors apart two Monte-Carlo KLs must be to count as different."""

    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    toy2d_metrics: list[str] = field(default_factory=lambda: ["kl", "tv", "off_mode"])
    images_metrics: list[str] = field(default_factory=lambda: ["kl", "domain_fd_teacher"])
    lower_is_better: list[str] = field(default_factory=lambda: ["kl"])
    higher_is_better: list[str] = field(default_factory=list)
    ma_comparisons: list[str] = field(default_factory=lambda: ["perflow_ma - perflow", "reflow_ma - reflow"])
    alpha: float = 0.05
    z: float = 2.0

    def validate(self, where: str) -> None:
        check_nfe_list(self.nfe, f"{where}.nfe")
        check_name_list(self.toy2d_metrics, f"{where}.toy2d_metrics", "metric")
        check_name_list(self.images_metrics, f"{where}.images_metrics", "metric")
        check_name_list(self.ma_comparisons, f"{where}.ma_comparisons", "comparison")
        check_name_list(self.lower_is_better, f"{where}.lower_is_better", "quality metric")
        for i, metric in enumerate(self.higher_is_better):
            require(metric not in self.lower_is_better and self.higher_is_better.count(metric) == 1,
                    f"{where}.higher_is_better[{i}]", metric,
                    "listed twice, or also in lower_is_better: a metric has one better direction")
        for i, name in enumerate(self.ma_comparisons):
            require(len(name.split(" - ")) == 2 and all(name.split(" - ")), f"{where}.ma_comparisons[{i}]",
                    name, "write a comparison as 'treated - control', e.g. 'perflow_ma - perflow'")
        require(0.0 < self.alpha < 1.0, f"{where}.alpha", self.alpha, "must lie in (0, 1)")
        require(self.z > 0.0, f"{where}.z", self.z, "must be > 0")

    @property
    def directions(self) -> dict[str, str]:
        """Quality metric -> ``"lower"`` or ``"higher"``, the direction that is better."""
        return {**dict.fromkeys(self.lower_is_better, "lower"), **dict.fromkeys(self.higher_is_better, "higher")}

    def treated_control(self) -> list[tuple[str, str]]:
        """``(treated, control)`` of each MA comparison."""
        return [tuple(name.split(" - ")) for name in self.ma_comparisons]


SECTIONS = {"report": ReportConfig}
