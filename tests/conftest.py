"""Shared fixtures: small synthetic sections with known truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fibroquant.synthetic import SectionParams, make_section, write_pyramid_tiff

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def sirius_section():
    """A 768-px Sirius red section with moderate fibrosis and its truth."""
    return make_section(SectionParams(shape=(768, 768), fibrosis=0.7, fine_fibres=0.3), rng=11)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


#: small sections that still hold a few lobules (1.5 µm/px), so fibrosis drives true CPA
SMALL = SectionParams(shape=(512, 512), mpp=1.5, lobule_um=250, septum_width_um=12,
                      fine_fibres=0.0, n_lumens=2)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    """Six tiny slides: 3 control, 3 treated mice; one mouse has two sections."""
    d = tmp_path_factory.mktemp("slides")
    rows = []
    layout = [("c1", "control", 0.8), ("c2", "control", 0.9), ("c3", "control", 0.7),
              ("t1", "MSC", 0.35), ("t2", "MSC", 0.4), ("t3", "MSC", 0.3)]
    for i, (mouse, group, fib) in enumerate(layout):
        rgb, _ = make_section(SMALL.__class__(**{**SMALL.__dict__, "fibrosis": fib}),
                              rng=100 + i)
        name = f"{mouse}_s1.tif"
        write_pyramid_tiff(d / name, rgb, SMALL.mpp, min_level_px=128)
        rows.append({"slide": name, "mouse": mouse, "group": group, "sex": "F",
                     "dose": 0 if group == "control" else (1 if mouse == "t1" else 2),
                     "session": "A"})
    rgb, _ = make_section(SMALL.__class__(**{**SMALL.__dict__, "fibrosis": 0.85}), rng=7)
    write_pyramid_tiff(d / "c1_s2.tif", rgb, SMALL.mpp, min_level_px=128)
    rows.append({"slide": "c1_s2.tif", "mouse": "c1", "group": "control", "sex": "F",
                 "dose": 0, "session": "B"})
    pd.DataFrame(rows).to_csv(d / "samples.csv", index=False)
    return d
