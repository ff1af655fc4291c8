"""Shared fixtures: small synthetic sections with known truth."""

from __future__ import annotations

from pathlib import Path

import pytest

from fibroquant.synthetic import SectionParams, make_section

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def sirius_section():
    """A 768-px Sirius red section with moderate fibrosis and its truth."""
    return make_section(SectionParams(shape=(768, 768), fibrosis=0.7, fine_fibres=0.3), rng=11)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
