"""The related-methods stage's evaluation against closed forms: the exact flow map of a Gaussian
teacher has KL = TV = 0 at every NFE (its log-density is the teacher's, pointwise), and a flow map
that doubles the noise has the closed-form KL of two Gaussians; config errors name their key."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from marflow_core import GaussianMixtureTeacher
from replication.config import ConfigError
from replication.toy2d.config import EvalConfig
from replication.toy2d.related import RelatedConfig, evaluate_method

MU, SIGMA = torch.tensor([1.0, -2.0]), 0.5


class GaussianFlowMap(nn.Module):
    """``X_{s,t}(x) = t mu + r(t) / r(s) (x - s mu)`` with ``r(t)^2 = t^2 sigma^2 + (1 - t)^2``, the
    exact map of the teacher ``N(mu, sigma^2 I)``; ``widen`` scales the output's spread at ``t = 1``."""

    def __init__(self, widen: float = 1.0) -> None:
        super().__init__()
        self.widen = widen

    def forward(self, x, s, t):
        r = lambda u: (u**2 * SIGMA**2 + (1 - u) ** 2).sqrt()  # noqa: E731
        s, t = s[:, None], t[:, None]
        scale = torch.where(t == 1, torch.full_like(t, self.widen), torch.ones_like(t))
        return t * MU + scale * r(t) / r(s) * (x - s * MU)


@pytest.fixture
def setup():
    teacher = GaussianMixtureTeacher([1.0], [MU.tolist()], [SIGMA])
    return teacher, EvalConfig(n_samples=4000, nfe=[1, 2, 4], sw_projections=16, mmd_samples=100)


def test_exact_flow_map_scores_zero_divergence_at_every_nfe(setup):
    teacher, cfg = setup
    rows = evaluate_method("fmm_lmd", GaussianFlowMap(), RelatedConfig(), teacher, cfg)
    assert [r["nfe"] for r in rows] == cfg.nfe
    for r in rows:
        assert abs(r["kl"]) < 1e-5 and abs(r["tv"]) < 1e-5 and r["folded"] == 0 and not r["crosses_windows"]
        assert r["mode_mass_error"] == 0 and r["status"] == "ok"


def test_widened_flow_map_has_the_closed_form_gaussian_kl(setup):
    """``q = N(mu, (c sigma)^2 I)``, ``p = N(mu, sigma^2 I)`` in 2-D: ``KL = 2 (c^2 / 2 - 1/2 - log c)``."""
    teacher, cfg = setup
    c = 1.5
    rows = evaluate_method("fmm_emd", GaussianFlowMap(c), RelatedConfig(), teacher, cfg)
    closed = 2 * (c**2 / 2 - 0.5 - math.log(c))
    for r in rows:
        assert abs(r["kl"] - closed) < 4 * r["kl_se"], (r["kl"], closed)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("methods", ["nosuch"], r"toy2d_related.methods\[0\] = 'nosuch'"),
    ("methods", ["lfm_distilled"], "list lfm too"),
    ("ou_steps", [0.2, -1.0], r"toy2d_related.ou_steps = \[0.2, -1.0\]"),
    ("n_seeds", 1, "toy2d_related.n_seeds = 1"),
    ("distill_steps", 0, "toy2d_related.distill_steps = 0"),
])
def test_bad_settings_name_their_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RelatedConfig(**{key: value}).validate("toy2d_related")
