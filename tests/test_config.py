from pathlib import Path

import pytest

from fibroquant.config import Settings, Stain, load_settings
from fibroquant.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sirius_red.yaml", "masson.yaml"])
def test_example_configs_load_and_mirror_defaults(name):
    s = load_settings(ROOT / "configs" / name)
    expected = Settings(stains={"stain": Stain.MASSON if "masson" in name else Stain.SIRIUS_RED})
    assert s == expected


def test_cli_overrides_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stains:\n  stain: masson\ncollagen:\n  relative_threshold: 0.3\n")
    s = load_settings(f, {"stains": {"stain": "sirius-red"}})
    assert s.stains.stain == Stain.SIRIUS_RED and s.collagen.relative_threshold == 0.3


@pytest.mark.parametrize(("text", "match"), [
    ("tissue:\n  lumen_min_area_um: 5\n",
     r"tissue\.lumen_min_area_um: unknown setting; did you mean tissue\.lumen_min_area_um2\?"),
    ("collagen:\n  relative_threshold: 2\n", r"collagen\.relative_threshold: should be less"),
    ("collagen:\n  relative_threshold: abc\n",
     r"collagen\.relative_threshold: expected a number, got 'abc'"),
    ("colagen:\n  relative_threshold: 0.2\n", r"colagen: unknown setting; did you mean collagen\?"),
    ("stains: [1, 2\n", "not a readable YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_names_key_and_file(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings(f)
    assert "bad.yaml" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_settings_hash_ignores_output_sizes_but_not_science():
    a = Settings()
    for tiling in ({"qc_max_px": 800}, {"input_timeout_s": 5}):
        assert a.settings_hash() == load_settings(overrides={"tiling": tiling}).settings_hash()
    # the kept masks' size is the fibre traits' resolution on large slides
    assert a.settings_hash() != load_settings(
        overrides={"tiling": {"mask_max_mpx": 16.0}}).settings_hash()
    off = load_settings(overrides={"traits": False})
    assert off.settings_hash() == load_settings(
        overrides={"traits": False, "tiling": {"mask_max_mpx": 16.0}}).settings_hash()
    # the tile size moves collagen area slightly (specks cut by a tile's edge are kept)
    assert a.settings_hash() != load_settings(overrides={"tiling": {"tile_px": 512}}).settings_hash()
    assert a.settings_hash() != load_settings(
        overrides={"collagen": {"relative_threshold": 0.3}}).settings_hash()
    assert a.settings_hash() != load_settings(
        overrides={"tiling": {"analysis_mpp": 1.0}}).settings_hash()


def test_read_oversample_counts_only_with_an_analysis_resolution():
    def h(**tiling):
        return load_settings(overrides={"tiling": tiling}).settings_hash()

    assert h() == h(read_oversample=1)  # native resolution: no level is chosen
    assert h(analysis_mpp=1.0) != h(analysis_mpp=1.0, read_oversample=1)
