"""Fixtures: MiniLM loaded once, and one recorded sentence."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from attnkit.models import load

    return load(minilm_path)


@pytest.fixture(scope="session")
def cat_explanation(minilm):
    from attnkit.apps.explain import explain

    return explain("The cat sat on the mat.", loaded=minilm, capture_inputs=True)
