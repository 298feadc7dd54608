"""Shared fixtures: tiny models of every supported family (see premoe.testing.FAMILIES), each saved as
its row's variant (tied or untied head, bias flags, sharded or one file, storage dtype)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from premoe.core.data import write_jsonl
from premoe.testing import FAMILIES, TWO_TASKS, build_family, build_model, family_variant, save_model  # noqa: F401  (re-exported)

# A server holding quantised weights tunes glibc for the whole process (premoe.core.memory.release_freed_blocks):
# faster tests keep its default.
os.environ.setdefault("PREMOE_KEEP_HEAP", "1")


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)`` -> directory of row ``name``'s tiny model, built once per session as its
    :func:`~premoe.testing.family_variant`; the directory is named after the variant."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build_family(name, tmp_path_factory.mktemp(f"{name}-{family_variant(name)}"))
        return cache[name]

    return get


def _available(name: str) -> bool:
    from transformers import CONFIG_MAPPING

    return FAMILIES[name][0] in CONFIG_MAPPING


def _param(name: str):
    if not _available(name):  # families the installed transformers does not ship yet are skipped, not failed
        return pytest.param(name, id=name, marks=pytest.mark.skip(reason="not in this transformers"))
    return pytest.param(name, id=f"{name}-{family_variant(name)}")  # the id names the row's variant


@pytest.fixture(params=[_param(n) for n in sorted(FAMILIES)])
def family(request):
    """Every row of premoe.testing.FAMILIES (a name); the MoE contract in tests/contract/test_moe_family.py."""
    return request.param


@pytest.fixture
def two_tasks(family_dir, tmp_path):
    """``two_tasks(name)`` -> (model directory, store with tasks "a" and "b" of premoe.testing.TWO_TASKS)."""
    import premoe

    def make(name):
        src = family_dir(name)
        for task, rows in TWO_TASKS.items():
            premoe.calibrate(src, write_jsonl(tmp_path / f"{task}.jsonl", rows), task, tmp_path / "s", progress=False)
        return src, tmp_path / "s"

    return make


@pytest.fixture
def small_data(tmp_path):
    rows = [{"prompt": f"add {i}+{i + 3}=", "completion": str(2 * i + 3)} for i in range(6)]
    rows += [{"text": "reverse abc=cba"}, {"text": "sort 321=123"}]
    return write_jsonl(tmp_path / "data.jsonl", rows)
