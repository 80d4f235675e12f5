"""Named random streams: one rule, re-derived here from its definition (sha256 of root/name/indices)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from marflow_core import derive_seed, stream
from marflow_core.reflow import shard_seed
from marflow_core.training import step_generator


def _expected(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def test_seed_is_sha256_of_the_path():
    assert derive_seed(0, "train-step", 5) == _expected("0/train-step/5")
    assert derive_seed(1234, "eval-noise") == _expected("1234/eval-noise")
    assert shard_seed(7, 3) == _expected("7/reflow-shard/3")


def test_streams_are_distinct_and_reproducible():
    seeds = {derive_seed(r, n, *i) for r in (0, 1) for n in ("a", "b") for i in ((), (0,), (1,), (0, 1))}
    assert len(seeds) == 16
    a, b = torch.rand(4, generator=stream(3, "x", 2)), torch.rand(4, generator=stream(3, "x", 2))
    assert torch.equal(a, b)
    steps = [torch.rand(3, generator=step_generator(0, s)) for s in range(3)]
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])


@pytest.mark.parametrize("name", ["", "a/b"])
def test_bad_stream_names_are_refused(name):
    with pytest.raises(ValueError):
        derive_seed(0, name)
