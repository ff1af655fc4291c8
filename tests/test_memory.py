"""How a slide's data is held to keep its peak memory low: masks as bits, thumbnail planes
band by band, the trait tiles' gate, the vessel map's rings, code pages given back. Each gives
the values the plain computation gives, to the bit."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fibroquant import synthetic_fibres as sf
from fibroquant import traits as tr
from fibroquant.bitmask import BitMask
from fibroquant.config import TraitSettings, load_settings
from fibroquant.stains import channel_sum, preset_for, rgb_to_od


def _mask(shape: tuple[int, int], seed: int, p: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (33, 1001)])
def test_bitmask_holds_a_mask_and_its_windows_as_numpy_does(shape):
    mask = _mask(shape, 1)
    bits = BitMask.pack(mask)
    assert bits.nbytes == shape[0] * math.ceil(shape[1] / 8)
    np.testing.assert_array_equal(bits.unpack(), mask)
    np.testing.assert_array_equal(np.asarray(bits), mask)
    assert bits.count() == int(mask.sum()) and bits.any() == bool(mask.any())
    rng = np.random.default_rng(2)
    for _ in range(50):  # windows anywhere, byte-aligned or not, clipped at the edges
        y0, x0 = (int(rng.integers(0, n)) for n in shape)
        y1, x1 = y0 + int(rng.integers(0, 20)), x0 + int(rng.integers(0, 40))
        np.testing.assert_array_equal(bits[y0:y1, x0:x1], mask[y0:y1, x0:x1])
    np.testing.assert_array_equal(bits[::2, 1:], mask[::2, 1:])  # any other key: unpacked


def test_bitmask_writes_windows_as_numpy_writes_them():
    shape = (40, 203)
    want = np.zeros(shape, bool)
    bits = BitMask(shape)
    rng = np.random.default_rng(3)
    for _ in range(200):
        y0, x0 = int(rng.integers(0, 40)), int(rng.integers(0, 203))
        y1, x1 = min(y0 + int(rng.integers(1, 12)), 40), min(x0 + int(rng.integers(1, 30)), 203)
        block = rng.random((y1 - y0, x1 - x0)) < 0.5
        want[y0:y1, x0:x1] = block
        bits[y0:y1, x0:x1] = block
        if rng.random() < 0.2:
            want[y0:y1, x0:x1] = False
            bits[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(bits.unpack(), want)
    assert bits == BitMask.pack(want)
    with pytest.raises(TypeError):
        bits[0, 0] = True
    with pytest.raises(ValueError, match="do not hold"):
        BitMask((4, 9), np.zeros((4, 1), np.uint8))


def test_bitmask_unpacks_as_an_image_into_one_buffer():
    a, b = _mask((300, 77), 4), _mask((300, 77), 5)
    buf = np.empty((300, 77), np.uint8)
    out = BitMask.pack(a).unpack(255, out=buf)
    assert out is buf
    np.testing.assert_array_equal(buf, a.astype(np.uint8) * 255)
    BitMask.pack(b).unpack(255, out=buf)  # the same buffer serves the next mask
    np.testing.assert_array_equal(buf, b.astype(np.uint8) * 255)
    np.testing.assert_array_equal(BitMask.pack(b).unpack(255), b.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="uint8 of shape"):
        BitMask.pack(a).unpack(255, out=np.empty((300, 76), np.uint8))


def test_qc_overlay_from_bits_is_the_overlay_from_bool_masks(tmp_path: Path):
    """write_qc reads a result's bits (unpacked to 0/255 into one buffer) and writes the JPEG
    that the bool masks give, byte for byte, through the resampled path (masks larger than
    the overlay)."""
    from fibroquant.report import write_qc

    h, w = 530, 610
    rng = np.random.default_rng(6)
    tissue = np.zeros((h, w), bool)
    tissue[40:500, 30:590] = True
    collagen = tissue & (rng.random((h, w)) < 0.2)
    excluded = np.zeros((h, w), bool)
    excluded[100:200, 100:260] = True
    thumb = rng.integers(120, 250, (200, 230, 3), dtype=np.uint8)
    flags = np.zeros((50, 60), np.uint8)
    common = {"thumbnail": thumb, "mask_mpp": 2.5, "flags": flags, "stain": "sirius-red"}
    plain = SimpleNamespace(collagen_mask=collagen, tissue_mask=tissue & ~excluded,
                            excluded_mask=excluded, **common)
    packed = SimpleNamespace(collagen_bits=BitMask.pack(collagen),
                             tissue_bits=BitMask.pack(tissue & ~excluded),
                             excluded_bits=BitMask.pack(excluded), **common)
    write_qc(tmp_path / "plain.jpg", plain, max_px=230, title="s")
    write_qc(tmp_path / "packed.jpg", packed, max_px=230, title="s")
    assert (tmp_path / "plain.jpg").read_bytes() == (tmp_path / "packed.jpg").read_bytes()


@pytest.fixture(scope="module")
def fibres() -> sf.FibreTruth:
    return sf.vessels_and_septa(shape=(700, 650), n_vessels=4, n_fine=30, rng=8)


def test_traits_of_bits_equal_traits_of_arrays(fibres):
    plain = tr.measure_slide(fibres.collagen, fibres.tissue, fibres.mpp,
                             TraitSettings(mpp=fibres.mpp, tile_px=256), lumen=fibres.lumen,
                             lumen_mpp=fibres.mpp)
    packed = tr.measure_slide(BitMask.pack(fibres.collagen), BitMask.pack(fibres.tissue),
                              fibres.mpp, TraitSettings(mpp=fibres.mpp, tile_px=256),
                              lumen=fibres.lumen, lumen_mpp=fibres.mpp, workers=2)
    assert plain.keys() == packed.keys()
    for k, v in plain.items():
        assert v == packed[k] or (math.isnan(v) and math.isnan(packed[k])), k


def test_gated_trait_tiles_run_one_at_a_time_and_sum_the_same(fibres, monkeypatch):
    """With one permit of the gate (the QC overlay running beside them), two trait threads
    measure one tile at a time; once the permit comes back both run; the sums are the same."""
    params = tr.params_for(TraitSettings(), fibres.mpp)
    want = tr.measure_masks(fibres.collagen, fibres.tissue, params, tile_px=160)
    running = peak = 0
    lock = threading.Lock()
    measure = tr.measure_tile

    def counting(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.01)
            return measure(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(tr, "measure_tile", counting)
    gate = threading.Semaphore(1)
    got = tr.measure_masks(fibres.collagen, fibres.tissue, params, tile_px=160, workers=2,
                           gate=gate)
    assert peak == 1
    assert got.traits(params) == pytest.approx(want.traits(params), nan_ok=True, rel=0, abs=0)
    gate.release()
    peak = 0
    tr.measure_masks(fibres.collagen, fibres.tissue, params, tile_px=160, workers=2, gate=gate)
    assert peak == 2


def test_vessel_map_for_one_ring_keeps_its_labels_only(fibres):
    vm = tr.vessel_map(fibres.lumen, fibres.mpp, fibres.mpp, 150.0)
    assert vm is not None
    rings = vm.ring_labels(50.0).copy()
    small = vm.for_ring(50.0)
    np.testing.assert_array_equal(small.ring_labels(50.0), rings)
    assert small.distance_um.size == 0 and small.nearest.size == 0
    assert (small.n, small.scale) == (vm.n, vm.scale)
    with pytest.raises(ValueError, match="rings of"):
        small.ring_labels(30.0)


@pytest.mark.parametrize("shares", [True, False])
def test_thumbnail_planes_band_by_band_equal_the_whole_image(shares):
    """The threshold map's planes, band by band (no whole OD or concentration image), are the
    whole-image computation's to the bit (H not a multiple of the band)."""
    from fibroquant.pipeline import CONC_BAND_ROWS, _thumbnail_planes

    settings = load_settings(overrides={"stains": {"stain": "sirius-red"}})
    stains = preset_for(settings.stains)
    rng = np.random.default_rng(7)
    thumb = rng.integers(0, 256, (2 * CONC_BAND_ROWS + 37, 301, 3), dtype=np.uint8)
    background = (236.0, 231.5, 240.0)
    col_p, counter, tshare, above = _thumbnail_planes(thumb, background, stains, 0.15,
                                                      shares=shares)
    conc = rgb_to_od(thumb, background) @ stains.unmixing
    np.testing.assert_array_equal(col_p, conc[..., stains.collagen_index])
    assert counter is not None
    np.testing.assert_array_equal(counter, conc[..., 1])
    if not shares:
        assert tshare is None and above is None
        return
    pos = np.maximum(conc, 0)
    total = channel_sum(pos)
    np.testing.assert_array_equal(above, total > 0.15)
    want = pos[..., stains.collagen_index] / np.maximum(total, 1e-6)
    assert tshare is not None and tshare.dtype == np.float32
    np.testing.assert_array_equal(tshare.view(np.uint32), want.view(np.uint32))


def test_code_pages_given_back_are_read_again_when_numba_compiles():
    numba = pytest.importorskip("numba")
    from fibroquant.cores import release_code_pages

    assert release_code_pages() >= 0

    @numba.njit(cache=False)
    def twice_sum(x):
        return (2 * x).sum()

    assert twice_sum(np.arange(10.0)) == 90.0  # LLVM runs again from the page cache
    assert release_code_pages(("no-such-library",)) == 0
