"""Property-based tests of params validation over the whole config space (every tier's sections).

For any params file made from a valid one by corrupting one value or inserting one key, validation
either accepts it or raises ``ConfigError`` naming that key, before any work: never another
exception, and never a non-finite number accepted. New tiers are covered automatically: the
strategies walk whatever sections the registry lists, starting from the committed params and the
tiny profile.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from params_helpers import with_value

from replication import registry
from replication.config import ConfigError, deep_merge, load_params

ROOT = Path(__file__).resolve().parents[1]
BASE = load_params(ROOT / "params.yaml")
PROFILES = {"default": BASE, "tiny": deep_merge(BASE, load_params(ROOT / "replication/profiles/tiny.yaml"))}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def leaf_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a leaf (scalars and lists of scalars) of the tier sections."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaf_paths(v, (*prefix, k))]
    return [prefix]


def dict_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    if not isinstance(node, dict):
        return []
    return [prefix] + [p for k, v in node.items() for p in dict_paths(v, (*prefix, k))]


SECTIONS = [name for name in registry.sections() if name in BASE]
LEAVES = [p for name in SECTIONS for p in leaf_paths(BASE[name], (name,))]
DICTS = [p for name in SECTIONS for p in dict_paths(BASE[name], (name,))]

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0, -1, 10**12, 0.5, "", True]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-10**9, max_value=10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(-5, 5), st.text(max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(-3, 3), max_size=2),
)


def _get(d: dict, path: tuple) -> Any:
    for key in path:
        d = d[key]
    return d


_set = with_value


def _key_path(path: tuple) -> str:
    return ".".join(str(k) for k in path)


NUMERIC_LEAVES = [p for p in LEAVES if isinstance(_get(BASE, p), int | float)
                  and not isinstance(_get(BASE, p), bool)]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_no_numeric_key_accepts_a_non_finite_number(value):
    assert len(NUMERIC_LEAVES) > 20
    for path in NUMERIC_LEAVES:
        with pytest.raises(ConfigError) as err:
            registry.validate_all(_set(BASE, path, value))
        assert f"{_key_path(path)} = " in str(err.value)


def test_committed_profiles_are_valid():
    for params in PROFILES.values():
        registry.validate_all(params)


@SETTINGS
@given(profile=st.sampled_from(sorted(PROFILES)), path=st.sampled_from(LEAVES), value=values)
def test_one_corrupted_value_is_accepted_or_named(profile, path, value):
    params = _set(PROFILES[profile], path, value)
    try:
        registry.validate_all(params)
    except ConfigError as err:
        message = str(err)
        named = [_key_path(path[:i]) for i in range(1, len(path) + 1)]
        assert any(f"{n} = " in message or f"{n}[" in message or f"{n}." in message for n in named), (
            f"error for {_key_path(path)} = {value!r} does not name it: {message}")
        return
    # accepted: then the value was acceptable where it stands, and never a non-finite number
    flat = value if isinstance(value, list) else [value]
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in flat), (
        f"{_key_path(path)} = {value!r} was accepted")


@SETTINGS
@given(profile=st.sampled_from(sorted(PROFILES)), path=st.sampled_from(DICTS),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10), value=values)
def test_an_unknown_key_is_named(profile, path, key, value):
    node = _get(PROFILES[profile], path)
    if key in node:
        return
    params = _set(PROFILES[profile], (*path, key), value)
    with pytest.raises(ConfigError) as err:
        registry.validate_all(params)
    assert _key_path((*path, key)) in str(err.value), str(err.value)


@SETTINGS
@given(path=st.sampled_from(LEAVES))
def test_a_missing_key_never_crashes(path):
    params = copy.deepcopy(BASE)
    parent = _get(params, path[:-1])
    del parent[path[-1]]
    try:
        registry.validate_all(params)
    except ConfigError as err:
        assert str(path[0]) in str(err)


@SETTINGS
@given(section=st.sampled_from(SECTIONS), value=values)
def test_a_section_of_the_wrong_type_is_named(section, value):
    if isinstance(value, dict):
        return
    with pytest.raises(ConfigError, match=rf"^{section}"):
        registry.validate_all({**BASE, section: value})


@SETTINGS
@given(steps=st.integers(1, 10**6), lr=st.floats(1e-8, 10.0), warmup=st.integers(0, 10**4),
       batch=st.integers(1, 4096), weight=st.floats(0.0, 100.0), substeps=st.integers(1, 64))
def test_valid_values_are_accepted(steps, lr, warmup, batch, weight, substeps):
    params = copy.deepcopy(BASE)
    train = params["toy2d_train"]
    train.update(steps=steps, lr=lr, warmup=warmup, batch_size=batch, checkpoint_every=steps,
                 snapshot_every=steps, log_every=1)
    train["ma"].update(weight=weight, substeps=substeps)
    registry.validate_all(params)
