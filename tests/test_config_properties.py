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
import re
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


GPU_FILE = "replication/gpu/params.yaml"
#: both params files as their stages read them (the GPU file with ``device: cpu``: no GPU here)
FILES = {"params.yaml": BASE, GPU_FILE: with_value(load_params(ROOT / GPU_FILE), ("cifar10", "device"), "cpu")}
#: mappings whose entries are the user's own (students, evaluated models, sweep families, tuned
#: students, ablation variants, a family's fixed settings, a variant's overrides): dropping one is a
#: choice (a cross-section check names a family the stages need)
USER_MAPPINGS = ("students", "models", "families", "select", "variants", "fixed", "overrides")


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a params tree, but the entries of ``USER_MAPPINGS``."""
    if not isinstance(node, dict):
        return []
    out = []
    for key, value in node.items():
        path = (*prefix, key)
        if not (prefix and prefix[-1] in USER_MAPPINGS):
            out.append(path)
        out.extend(key_paths(value, path))
    return out


DROPPABLE = [(f, p) for f, params in FILES.items() for name in registry.sections(f)
             for p in key_paths({name: params[name]})]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry=st.sampled_from(DROPPABLE))
def test_a_dropped_key_is_refused_naming_it(entry):
    """Any one key of any section of either params file, deleted: the stages that read the section
    refuse it, naming the key (every parameter is written out; nothing falls back to a default)."""
    params_file, path = entry
    params = copy.deepcopy(FILES[params_file])
    del _get(params, path[:-1])[path[-1]]
    with pytest.raises(ConfigError) as err:
        registry.section(params, path[0])
    message, where, key = str(err.value), _key_path(path[:-1]), path[-1]
    named = (message.startswith(f"{_key_path(path)}: ") or
             (where and message.startswith(f"{where}.") and repr(key) in message))
    assert named, f"dropping {_key_path(path)} from {params_file}: {message}"
    assert "missing" in message


KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w-]*):(\s|$)")


def block_key_lines(text: str) -> list[int]:
    """Indices of the lines that are one whole ``key: value`` entry of a block mapping (not inside
    or opening a flow collection that continues on the next line)."""
    out, depth = [], 0
    for i, line in enumerate(text.splitlines()):
        code = line.split("#", 1)[0]
        opened = sum(code.count(c) for c in "{[") - sum(code.count(c) for c in "}]")
        if depth == 0 and opened == 0 and KEY_LINE.match(line):
            out.append(i)
        depth += opened
    return out


DUPLICABLE = [(f, i) for f in FILES for i in block_key_lines((ROOT / f).read_text())]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry=st.sampled_from(DUPLICABLE))
def test_a_duplicated_key_is_refused_naming_it_and_both_lines(entry, tmp_path_factory):
    """Any one ``key:`` line of either params file, written twice: refused as DVC refuses it, with
    the key and both line numbers (never "the last one wins")."""
    params_file, index = entry
    lines = (ROOT / params_file).read_text().splitlines()
    key = KEY_LINE.match(lines[index]).group(2)
    lines.insert(index + 1, lines[index])
    path = tmp_path_factory.mktemp("dup") / "params.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(path, overlay=False)
    assert str(err.value) == (f"{path}, line {index + 2}, column {len(KEY_LINE.match(lines[index]).group(1)) + 1}:"
                              f" duplicate key {key!r} (first at line {index + 1}); DVC refuses such a file "
                              f"too: keep one of them")


def test_a_duplicated_key_inside_a_flow_mapping_is_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("{hidden: 64, depth: 2,", "{hidden: 64, hidden: 32, depth: 2,")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"duplicate key 'hidden'"):
        load_params(tmp_path / "params.yaml")


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
