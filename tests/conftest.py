"""Shared fixtures: tiny models of every supported family (see premoe.testing.FAMILIES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from premoe.testing import FAMILIES, build_model, save_model  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """``family_dir(name)`` -> directory of a saved tiny model of that family (built once per session)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            model_type, overrides, _ = FAMILIES[name]
            model, tok = build_model(model_type, overrides)
            cache[name] = save_model(model, tok, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _available(name: str) -> bool:
    from transformers import CONFIG_MAPPING

    return FAMILIES[name][0] in CONFIG_MAPPING


# Families the installed transformers does not ship yet (premoe is tested with 5.25) are skipped, not failed.
@pytest.fixture(params=[pytest.param(n, marks=() if _available(n) else pytest.mark.skip(reason="not in this transformers"))
                        for n in sorted(FAMILIES)])
def family(request):
    return request.param


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small_data(tmp_path):
    rows = [{"prompt": f"add {i}+{i + 3}=", "completion": str(2 * i + 3)} for i in range(6)]
    rows += [{"text": "reverse abc=cba"}, {"text": "sort 321=123"}]
    return write_jsonl(tmp_path / "data.jsonl", rows)
