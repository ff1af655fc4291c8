"""Synthetic stained liver sections with known collagen, by Beer-Lambert image formation.

A section is drawn as stain *concentration* maps (OD units along each stain vector) from masks
whose truth is known: liver parenchyma with cells, nuclei, sinusoids and fat vacuoles; portal
tracts and central veins (lumens, to be excluded); bridging septa around lobules; faint
pericellular fibres; non-specific uptake of the collagen stain in parenchyma; a Glisson capsule
at the section edge (excluded from CPA); optionally air bubbles under the coverslip (a dark, grey
refractile rim; the tissue under them paler; excluded from CPA). The image is then formed as
``I = I0 · 10^-(C · M)`` with the slide's own stain vectors ``M`` (drifted from the preset), a
tinted glass intensity ``I0``, optical blur, sensor noise and JPEG compression.

Everything that varies in real staining is a parameter of :class:`SectionParams`, so tests and
benchmarks can check CPA, Dice and areas against truth across realistic ranges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from fibroquant.stains import (
    HAEMATOXYLIN_VECTOR,
    MASSON,
    MASSON_LIGHT_GREEN,
    SIRIUS_RED,
    StainMatrix,
    mix,
)

if TYPE_CHECKING:
    import pandas as pd

StainName = Literal["sirius-red", "masson", "masson-light-green"]


@dataclass(frozen=True)
class SectionParams:
    """Everything that varies between synthetic sections.

    Sizes are physical (µm); concentrations are OD units along unit stain vectors.
    """

    stain: StainName = "sirius-red"
    shape: tuple[int, int] = (1536, 1536)
    mpp: float = 0.5
    field_of_view: bool = False  # True: tissue fills the frame (microscope field), no capsule
    fibrosis: float = 0.5  # 0 = normal liver, 1 = established cirrhosis
    lobule_um: float = 450.0  # spacing of lobule centres
    septum_width_um: float = 10.0  # at fibrosis 1; scaled by fibrosis
    fine_fibres: float = 0.5  # amount of faint pericellular fibres (0-1)
    fibre_intensity: float = 0.45  # faint fibres relative to septa
    collagen_od: float = 0.75  # typical collagen stain concentration in septa
    counterstain_od: float = 0.30  # picric acid / ponceau in cytoplasm
    nuclear_od: float = 0.6
    stain_intensity: float = 1.0  # all stains (section thickness, staining time)
    collagen_intensity: float = 1.0  # the collagen stain alone (reagent batch)
    nonspecific: float = 0.08  # collagen stain in parenchyma, relative to collagen_od
    vector_drift_deg: float = 0.0
    background_rgb: tuple[float, float, float] = (246.0, 244.0, 240.0)
    blur_um: float = 0.0  # Gaussian sigma of the optics
    noise_sd: float = 1.5  # sensor noise, grey levels
    jpeg_quality: int | None = None
    capsule_um: float = 15.0  # Glisson capsule width (sections only)
    n_lumens: int = 5
    steatosis: float = 0.1  # fraction of parenchyma in fat vacuoles
    # collagen stain taken up by hepatocyte cytoplasm, as a fraction of its counterstain: the
    # purple (red + aniline blue) cytoplasm of an under-differentiated Masson trichrome; 0 = none
    cytoplasm_blue: float = 0.0
    cytoplasm_blue_cv: float = 0.5  # cell-to-cell variation of that fraction (lavender cells)
    bubbles: int = 0  # air bubbles under the coverslip (50-400 µm), anywhere in the image
    # tissue folds: flaps of the section's edge (15-25 % of its radius deep) folded back over
    # the section along a straight line, a double layer there (sections only, not fields)
    folds: int = 0
    # uneven illumination of a microscope field: fraction of the light lost at the corners,
    # about an optical centre up to 10 % off the image centre (0 = evenly lit, as a scanner)
    vignetting: float = 0.0
    # uneven section thickness: coefficient of variation of all stains' amount, smooth over
    # ~300 µm (a microtome's chatter and a section's wedge); 0 = even
    thickness_cv: float = 0.0
    # lateral chromatic aberration / colour-plane misregistration of the camera: the red and
    # blue planes shifted this far (px, opposite ways, one random direction) against green;
    # coloured fringes at every sharp edge (fat vacuoles, lumens)
    channel_shift_px: float = 0.0
    # nuclear stain: Weigert's iron haematoxylin (near-black) or a plain haematoxylin whose
    # blue-purple (Ruifrok & Johnston's vector) is close to aniline blue in colour
    nuclear_stain: Literal["iron-haematoxylin", "haematoxylin"] = "iron-haematoxylin"


@dataclass
class Truth:
    """What the section really contains (all masks bool, same shape as the image)."""

    params: SectionParams
    stains: StainMatrix
    tissue_mask: np.ndarray  # countable tissue: section minus lumens and capsule
    collagen_mask: np.ndarray  # collagen within tissue_mask
    lumen_mask: np.ndarray
    capsule_mask: np.ndarray
    section_mask: np.ndarray = field(repr=False)
    bubble_mask: np.ndarray | None = field(default=None, repr=False)
    """Air bubbles, rim included, over tissue and glass alike (all False without bubbles; None
    only when a Truth is built by hand without it). Excluded from ``tissue_mask``."""
    fold_mask: np.ndarray | None = field(default=None, repr=False)
    """Folds: the double layer where a flap landed (all False without folds; None only when a
    Truth is built by hand without it). Excluded from ``tissue_mask``."""

    @property
    def cpa_percent(self) -> float:
        """True collagen proportionate area, %."""
        return 100.0 * float(self.collagen_mask.sum()) / max(int(self.tissue_mask.sum()), 1)

    @property
    def tissue_area_mm2(self) -> float:
        """True tissue area, mm²."""
        return float(self.tissue_mask.sum()) * self.params.mpp**2 / 1e6

    @property
    def collagen_area_mm2(self) -> float:
        """True collagen area, mm²."""
        return float(self.collagen_mask.sum()) * self.params.mpp**2 / 1e6

    @property
    def bubble_area_mm2(self) -> float:
        """True area of the section under air bubbles (the tissue they exclude), mm²."""
        if self.bubble_mask is None:
            return 0.0
        return float((self.bubble_mask & self.section_mask).sum()) * self.params.mpp**2 / 1e6


def _rng(rng: int | np.random.Generator | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _smooth_noise(shape: tuple[int, int], sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian random field with correlation length ``sigma_px``."""
    small = max(sigma_px / 4.0, 1.0)
    sub = (max(int(shape[0] / small) + 4, 8), max(int(shape[1] / small) + 4, 8))
    base = rng.standard_normal(sub).astype(np.float32)
    base = ndi.gaussian_filter(base, sigma_px / small, mode="wrap")
    up = cv2.resize(base, (int(sub[1] * small), int(sub[0] * small)), interpolation=cv2.INTER_CUBIC)
    up = up[: shape[0], : shape[1]]
    if up.shape != shape:
        up = cv2.resize(base, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    sd = float(up.std()) or 1.0
    return ((up - up.mean()) / sd).astype(np.float32)


def _rotate_vector(v: np.ndarray, deg: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate a unit vector by ``deg`` degrees in a random direction, keeping it positive."""
    v = v / np.linalg.norm(v)
    for _ in range(100):
        r = rng.standard_normal(3)
        r -= r.dot(v) * v
        r /= np.linalg.norm(r)
        w = np.cos(np.radians(deg)) * v + np.sin(np.radians(deg)) * r
        if np.all(w > 0.01):
            return w
    return v


def preset(stain: StainName) -> StainMatrix:
    """Preset stain matrix used to draw a section of ``stain``."""
    return {"sirius-red": SIRIUS_RED, "masson": MASSON, "masson-light-green": MASSON_LIGHT_GREEN}[
        stain
    ]


def make_section(
    params: SectionParams | None = None, *, rng: int | np.random.Generator | None = None
) -> tuple[np.ndarray, Truth]:
    """Draw one synthetic stained section.

    Parameters
    ----------
    params : SectionParams, optional
    rng : int or numpy.random.Generator, optional
        Seed or generator; the same seed gives the same section.

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)
    truth : Truth
    """
    p = params or SectionParams()
    g = _rng(rng)
    h, w = p.shape
    um = 1.0 / p.mpp  # pixels per µm
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # --- section outline (glass around it unless a field of view) -----------------------
    if p.field_of_view:
        section = np.ones((h, w), bool)
    else:
        cy, cx = h * g.uniform(0.45, 0.55), w * g.uniform(0.45, 0.55)
        ry, rx = h * g.uniform(0.33, 0.42), w * g.uniform(0.33, 0.42)
        r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        section = (r + 0.12 * _smooth_noise((h, w), 80 * um, g)) < 1.0
        section = ndi.binary_fill_holes(section)
        lab, n = ndi.label(section)
        if n > 1:
            sizes = ndi.sum(section, lab, range(1, n + 1))
            section = lab == (1 + int(np.argmax(sizes)))

    # --- lumens: central veins and portal vessels ---------------------------------------
    lumen = np.zeros((h, w), bool)
    wobble = _smooth_noise((h, w), 6 * um, g)
    dist_in0 = ndi.distance_transform_edt(section)
    for _ in range(p.n_lumens):
        rad = g.uniform(22, 60) * um
        margin = rad + (p.capsule_um * 1.3 + 15) * um  # vessels lie inside, below the capsule
        for _try in range(50):
            ly, lx = g.uniform(0, h), g.uniform(0, w)
            if p.field_of_view or dist_in0[int(ly), int(lx)] > margin:
                break
        else:
            continue
        asp = g.uniform(0.6, 1.0)
        ang = g.uniform(0, np.pi)
        dy, dx = yy - ly, xx - lx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rad
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (rad * asp)
        disc = (u * u + v * v + 0.08 * wobble) < 1.0
        lumen |= disc
    lumen &= section
    if not p.field_of_view:
        # lumens open to the edge are glass bays, not lumens; keep interior ones only
        lumen &= ndi.binary_erosion(section, iterations=max(int(3 * um), 1))

    # --- capsule band along tissue/glass edges -------------------------------------------
    dist_in = ndi.distance_transform_edt(section)
    capsule = np.zeros((h, w), bool)
    if not p.field_of_view and p.capsule_um > 0:
        width = p.capsule_um * (0.8 + 0.4 * (_smooth_noise((h, w), 60 * um, g) > 0))
        capsule = section & (dist_in <= width * um)

    # --- septa: bridging fibrosis along lobule boundaries --------------------------------
    collagen_conc = np.zeros((h, w), np.float32)
    septa = np.zeros((h, w), bool)
    if p.fibrosis > 0:
        spacing = p.lobule_um * um
        n_seeds = max(int(h * w / spacing**2 * 1.3), 2)
        seeds = np.column_stack([g.uniform(-0.1 * h, 1.1 * h, n_seeds),
                                 g.uniform(-0.1 * w, 1.1 * w, n_seeds)])
        warp = 25 * um
        wy = yy + warp * _smooth_noise((h, w), 40 * um, g)
        wx = xx + warp * _smooth_noise((h, w), 40 * um, g)
        tree = cKDTree(seeds)
        d = np.asarray(tree.query(np.column_stack([wy.ravel(), wx.ravel()]), k=2)[0])
        gap = (d[:, 1] - d[:, 0]).reshape(h, w).astype(np.float32)
        # keep a fibrosis-dependent fraction of septa (incomplete septa in early fibrosis)
        keep_noise = _smooth_noise((h, w), 120 * um, g)
        keep = keep_noise < np.float32(-1.0 + 3.0 * min(p.fibrosis, 1.0))
        width_px = max(p.septum_width_um * (0.35 + 0.65 * p.fibrosis), 1.5) * um
        local_w = width_px * (0.6 + 0.8 * (0.5 + 0.5 * np.tanh(_smooth_noise((h, w), 30 * um, g))))
        septa = (gap < local_w) & keep & section
        # periportal/perivascular rings
        ring = ndi.binary_dilation(lumen, iterations=max(int(p.fibrosis * 12 * um), 1)) & ~lumen
        septa |= ring & (_smooth_noise((h, w), 15 * um, g) < 1.2)
    fibres = np.zeros((h, w), bool)
    if p.fine_fibres > 0:
        n1 = _smooth_noise((h, w), 6 * um, g)
        thin = np.abs(n1) < 0.045 * max(um * 0.5, 0.6)  # ~1-2 µm wide lines
        patches = _smooth_noise((h, w), 40 * um, g) > (1.6 - 1.6 * p.fine_fibres)
        fibres = thin & patches & ~septa & section & ~lumen
        fibres = _remove_small(fibres, int(6 * um * um))
    coll_region = (septa | fibres) & section & ~lumen
    texture = np.exp(0.25 * _smooth_noise((h, w), 2 * um, g) + 0.12 * g.standard_normal((h, w)))
    level = p.collagen_od * p.collagen_intensity
    collagen_conc[septa & ~lumen] = level
    collagen_conc[fibres] = level * p.fibre_intensity
    collagen_conc *= texture.astype(np.float32)

    # --- parenchyma: cytoplasm, sinusoids, fat, nuclei -----------------------------------
    parench = section & ~lumen & ~coll_region
    cyto = p.counterstain_od * (1.0 + 0.2 * _smooth_noise((h, w), 3 * um, g))
    sinus = np.abs(_smooth_noise((h, w), 4 * um, g)) < 0.12
    cyto = np.where(sinus, cyto * 0.4, cyto)
    fat = np.zeros((h, w), bool)
    if p.steatosis > 0:
        n_fat = int(p.steatosis * parench.sum() / (np.pi * (7 * um) ** 2))
        if n_fat:
            fy = g.uniform(0, h, n_fat).astype(int)
            fx = g.uniform(0, w, n_fat).astype(int)
            seeds_img = np.zeros((h, w), bool)
            seeds_img[fy, fx] = True
            fat = ndi.distance_transform_edt(~seeds_img) < g.uniform(4, 10) * um
            fat &= parench
    cyto = np.where(fat, cyto * 0.05, cyto)
    counter = np.zeros((h, w), np.float32)
    counter[section & ~lumen] = cyto[section & ~lumen]
    counter[coll_region] *= 0.35
    nuclei = np.zeros((h, w), bool)
    n_nuc = int(parench.sum() / (25 * um) ** 2 * 1.0)
    if n_nuc:
        ny = g.uniform(0, h, n_nuc).astype(int)
        nx = g.uniform(0, w, n_nuc).astype(int)
        seeds_img = np.zeros((h, w), bool)
        seeds_img[ny, nx] = True
        nuclei = (ndi.distance_transform_edt(~seeds_img) < 3.0 * um) & parench & ~fat
    nuc_conc = np.where(nuclei, p.nuclear_od * (0.8 + 0.4 * g.random((h, w))), 0).astype(np.float32)
    uptake = p.nonspecific * p.collagen_od * p.collagen_intensity
    nonspec = np.where(parench & ~fat, uptake * (1.0 + 0.4 * _smooth_noise((h, w), 10 * um, g)), 0)
    collagen_conc = collagen_conc + np.maximum(nonspec, 0).astype(np.float32)
    capsule_conc = np.where(capsule, level * 1.1, 0).astype(np.float32)
    collagen_conc = np.maximum(collagen_conc, capsule_conc)

    if p.cytoplasm_blue > 0:
        # purple cytoplasm: each hepatocyte (~25 µm Voronoi cell) takes up its own proportion of
        # collagen stain (log-normal, median cytoplasm_blue), with fine texture inside the cell;
        # drawn only when asked for, so sections without it keep their seeds' exact pixels
        collagen_conc = collagen_conc + _cytoplasm_blue(p, counter, parench & ~fat, um, g)
    conc = np.stack([collagen_conc, counter, nuc_conc], axis=-1) * np.float32(p.stain_intensity)
    if p.thickness_cv > 0:  # drawn only when asked for (same seeds, same pixels without)
        thick = np.exp(p.thickness_cv * _smooth_noise((h, w), 300 * um, g)
                       - 0.5 * p.thickness_cv**2).astype(np.float32)
        conc *= thick[..., None]
    conc = np.clip(conc, 0, None).astype(np.float32)

    # --- folds: a flap of the edge folded back over the section (own generator) ---------
    fold = np.zeros((h, w), bool)
    if p.folds > 0 and not p.field_of_view:
        conc, section, fold = fold_flaps(conc, section, p.folds, g.spawn(1)[0])
        lumen &= section
        capsule &= section

    # --- air bubbles under the coverslip (own generator: the section is the same without) --
    bubble = np.zeros((h, w), bool)
    grey_od: np.ndarray | None = None
    if p.bubbles > 0:
        bubble, grey_od, pale = draw_bubbles((h, w), p.mpp, p.bubbles, g.spawn(1)[0])
        conc *= pale[..., None]

    base = preset(p.stain)
    base_vectors = base.vectors.astype(np.float64)
    if p.nuclear_stain == "haematoxylin":
        base_vectors = base_vectors.copy()
        base_vectors[2] = HAEMATOXYLIN_VECTOR
    vectors = np.array([_rotate_vector(v, p.vector_drift_deg, g) for v in base_vectors])
    stains = StainMatrix(base.names, vectors, p.background_rgb)
    od = mix(conc, stains)
    if grey_od is not None:
        od += grey_od[..., None]  # the refractile rim absorbs (scatters away) all colours alike
    bg = np.asarray(p.background_rgb, np.float32)
    intensity = bg * np.power(np.float32(10.0), -od)
    if p.blur_um > 0:
        intensity = cv2.GaussianBlur(intensity, (0, 0), p.blur_um * um)
    if p.vignetting > 0:
        intensity *= vignette((h, w), p.vignetting, g)[..., None]
    if p.channel_shift_px > 0:
        ang = g.uniform(0, 2 * np.pi)
        dy, dx = p.channel_shift_px * np.sin(ang), p.channel_shift_px * np.cos(ang)
        for c, sign in ((0, 1.0), (2, -1.0)):
            m = np.array([[1, 0, sign * dx], [0, 1, sign * dy]], np.float32)
            intensity[..., c] = cv2.warpAffine(np.ascontiguousarray(intensity[..., c]), m, (w, h),
                                               flags=cv2.INTER_LANCZOS4,
                                               borderMode=cv2.BORDER_REFLECT)
    if p.noise_sd > 0:
        shot = np.sqrt(np.maximum(intensity, 1.0) / 255.0)
        intensity = intensity + g.standard_normal(intensity.shape).astype(np.float32) * (
            np.float32(p.noise_sd) * shot
        )
    rgb = np.clip(np.rint(intensity), 0, 255).astype(np.uint8)
    if p.jpeg_quality is not None:
        _ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if decoded is None:  # pragma: no cover - OpenCV decodes what it just encoded
            raise RuntimeError("JPEG round trip of the synthetic section failed")
        rgb = decoded[..., ::-1].copy()

    tissue = section & ~lumen & ~capsule & ~bubble & ~fold  # artefacts are left out of CPA
    collagen = coll_region & tissue
    truth = Truth(p, stains, tissue, collagen, lumen, capsule & ~lumen, section, bubble,
                  fold & section)
    return rgb, truth


def vignette(shape: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Relative illumination of a camera frame, float32 ``shape``: 1 at the optical centre,
    ``1 - strength`` at the distance of the image's corners from its centre (quadratic
    fall-off; the far corners of an off-centre field a little darker still)."""
    h, w = shape
    cy = h * (0.5 + rng.uniform(-0.1, 0.1))
    cx = w * (0.5 + rng.uniform(-0.1, 0.1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rho2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / np.float32((h * h + w * w) / 4.0)
    return np.clip(1.0 - strength * rho2, 0.3, 1.0).astype(np.float32)


def _cytoplasm_blue(
    p: SectionParams, counter: np.ndarray, cytoplasm: np.ndarray, um: float,
    g: np.random.Generator,
) -> np.ndarray:
    """Collagen-stain concentration of purple cytoplasm (float32, OD units): the counterstain
    times a per-cell proportion (median ``p.cytoplasm_blue``, log-SD ``p.cytoplasm_blue_cv``)."""
    h, w = counter.shape
    n_cells = max(int(h * w / (25 * um) ** 2), 1)
    seeds = np.column_stack([g.uniform(0, h, n_cells), g.uniform(0, w, n_cells)])
    yy, xx = np.mgrid[0:h, 0:w]
    _, cell = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]))
    ratio = p.cytoplasm_blue * np.exp(p.cytoplasm_blue_cv * g.standard_normal(n_cells))
    texture = np.exp(0.2 * _smooth_noise((h, w), 1.5 * um, g))
    blue = ratio[cell.reshape(h, w)].astype(np.float32) * texture * counter
    return np.where(cytoplasm, blue, 0).astype(np.float32)


def fold_flaps(
    conc: np.ndarray, section: np.ndarray, n: int, rng: int | np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold flaps of a section's edge back over it.

    For each fold, a straight fold line cuts off a flap of the section at its edge, 15-25 % of
    the section's radius deep (measured from the line to the farthest edge point, at a random
    angle). The flap is reflected across the line onto the section: where it lands, the
    stain concentrations of both layers add (every stain doubled in parenchyma, the flap's own
    septa, capsule and nuclei on top of the layer below); where it was, there is now glass.

    Parameters
    ----------
    conc : ndarray of float32, shape (H, W, S)
        Stain concentrations of the single layer.
    section : ndarray of bool, shape (H, W)
    n : int
        Number of folds (at different angles).
    rng : int or numpy.random.Generator, optional

    Returns
    -------
    conc : ndarray of float32, shape (H, W, S)
    section : ndarray of bool
        Without the flaps' former place.
    fold : ndarray of bool
        The double layer.
    """
    g = _rng(rng)
    h, w = section.shape
    conc = conc.copy()
    section = section.copy()
    fold = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ys, xs = np.nonzero(section)
    if not len(ys):
        return conc, section, fold
    cy, cx = float(ys.mean()), float(xs.mean())
    radius = float(np.sqrt(len(ys) / np.pi))
    base = g.uniform(0, 2 * np.pi)
    for i in range(n):
        ang = base + 2 * np.pi * i / n + g.uniform(-0.3, 0.3)
        ny, nx = float(np.sin(ang)), float(np.cos(ang))  # outward normal of the fold line
        proj = (yy - cy) * ny + (xx - cx) * nx
        far = float(proj[section].max())
        line = far - g.uniform(0.15, 0.25) * radius
        flap = section & (proj > line)
        if not flap.any():
            continue
        # reflection across the line: x' = x - 2 (proj - line) n
        d = proj - line
        map_y = (yy - 2 * d * ny).astype(np.float32)
        map_x = (xx - 2 * d * nx).astype(np.float32)
        landed = cv2.remap(flap.view(np.uint8), map_x, map_y, cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0).view(bool) & (d < 0)
        layer = cv2.remap(conc, map_x, map_y, cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT).reshape(conc.shape)
        conc[flap] = 0.0
        section &= ~flap
        fold &= section
        landed &= section  # a flap landing beyond a concave edge lies on glass: not modelled
        conc[landed] += layer[landed]
        fold |= landed
    return conc, section, fold


def draw_bubbles(
    shape: tuple[int, int], mpp: float, n: int, rng: int | np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw air bubbles trapped under the coverslip.

    A bubble is a round or oval region, 50-400 µm across (log-uniform), its outline slightly
    irregular. Light crossing the curved air/mountant interface near its edge is refracted out of
    the objective's aperture, so the rim is a dark band (3-8 µm, varying along the outline) that
    absorbs all colours alike: a grey optical density added to the stains'. Inside, over glass the
    bubble looks like glass; over tissue the tissue shows, paler (the stain concentrations are
    scaled by 0.65-0.9). Centres lie anywhere in the image, so some bubbles overlap the section
    edge or the frame; bubbles do not overlap each other (in one thin mounting layer they would
    merge into one).

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(H, W)``, pixels.
    mpp : float
        µm per pixel.
    n : int
        Number of bubbles.
    rng : int or numpy.random.Generator, optional

    Returns
    -------
    bubble : ndarray of bool, shape ``shape``
        The bubbles, rim included.
    grey_od : ndarray of float32, shape ``shape``
        Achromatic optical density of the rims (the same in R, G and B), 0 elsewhere.
    pale : ndarray of float32, shape ``shape``
        Factor on the stain concentrations (< 1 inside bubbles, 1 elsewhere).
    """
    g = _rng(rng)
    h, w = shape
    um = 1.0 / mpp
    bubble = np.zeros((h, w), bool)
    grey = np.zeros((h, w), np.float32)
    pale = np.ones((h, w), np.float32)
    placed: list[tuple[float, float, float]] = []
    for _ in range(n):
        rad = 0.5 * float(np.exp(g.uniform(np.log(50.0), np.log(400.0)))) * um
        asp = g.uniform(0.75, 1.0)
        ang = g.uniform(0, np.pi)
        # bubbles in one mounting layer do not overlap (they would merge): place apart
        for _try in range(30):
            cy, cx = g.uniform(0, h), g.uniform(0, w)
            if all(np.hypot(cy - py, cx - px) > 1.05 * (rad + pr) for py, px, pr in placed):
                break
        else:
            continue
        placed.append((cy, cx, rad))
        rim_um = g.uniform(3.0, 8.0)
        peak = g.uniform(0.6, 1.1)  # grey OD: 8-25 % transmission, near black
        factor = g.uniform(0.65, 0.9)
        wobble_amp = g.uniform(0.0, 0.04)
        # work in the bubble's bounding box (plus margin), clipped to the image
        m = int(rad * 1.1) + 2
        y0, y1 = max(int(cy) - m, 0), min(int(cy) + m + 1, h)
        x0, x1 = max(int(cx) - m, 0), min(int(cx) + m + 1, w)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / rad
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (rad * asp)
        theta = np.arctan2(v, u)
        k = g.integers(2, 6)
        wob = wobble_amp * np.cos(k * theta + g.uniform(0, 2 * np.pi)).astype(np.float32)
        disc = (np.sqrt(u * u + v * v) + wob) < 1.0
        if not disc.any():
            continue
        # depth inside the outline (the frame of the image is not an edge of the bubble)
        pad = np.pad(disc, 1, mode="edge")
        depth = cv2.distanceTransform(pad.view(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1] * mpp
        # the band narrows and widens along the outline but never breaks
        width = rim_um * np.clip(1.0 + 0.3 * _smooth_noise(disc.shape, 15 * um, g), 0.6, 1.6)
        # dark at the outline, fading over the inner part of the band
        profile = np.clip((1.3 * width - depth) / (0.6 * width), 0.0, 1.0)
        rim_od = (peak * profile * (1.0 + 0.1 * _smooth_noise(disc.shape, 5 * um, g))).astype(
            np.float32
        )
        rim_od[~disc] = 0
        box = (slice(y0, y1), slice(x0, x1))
        grey[box] = np.maximum(grey[box], rim_od)
        pale[box] = np.where(disc, np.minimum(pale[box], np.float32(factor)), pale[box])
        bubble[box] |= disc
    return bubble, grey, pale


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def random_params(
    rng: int | np.random.Generator | None = None, **fixed: object
) -> SectionParams:
    """Draw section parameters over realistic ranges of staining and imaging variation.

    Parameters
    ----------
    rng : int or Generator, optional
    **fixed
        Parameters to hold fixed (e.g. ``stain="masson"``, ``fibrosis=0.8``).
    """
    g = _rng(rng)
    tint = np.array([246.0, 244.0, 240.0]) * g.uniform(0.9, 1.03, 3)
    drawn = SectionParams(
        fibrosis=float(g.uniform(0.05, 1.0)),
        lobule_um=float(g.uniform(300, 600)),
        septum_width_um=float(g.uniform(6, 18)),
        fine_fibres=float(g.uniform(0.0, 0.8)),
        fibre_intensity=float(g.uniform(0.4, 0.8)),
        collagen_od=float(g.uniform(0.55, 0.95)),
        counterstain_od=float(g.uniform(0.05, 0.4)),
        stain_intensity=float(g.uniform(0.7, 1.3)),
        collagen_intensity=float(g.uniform(0.6, 1.4)),
        nonspecific=float(g.uniform(0.0, 0.12)),
        vector_drift_deg=float(g.uniform(0, 8)),
        background_rgb=(float(min(tint[0], 255.0)), float(min(tint[1], 255.0)),
                        float(min(tint[2], 255.0))),
        blur_um=float(g.uniform(0.0, 1.0)),
        noise_sd=float(g.uniform(0.5, 3.0)),
        jpeg_quality=int(g.choice([70, 80, 90, 95])) if g.random() < 0.7 else None,
        capsule_um=float(g.uniform(4, 20)),
        n_lumens=int(g.integers(2, 7)),
        steatosis=float(g.uniform(0.0, 0.2)),
        field_of_view=bool(g.random() < 0.3),
    )
    # drawn after the others, so each seed's earlier parameters stay what they were
    # (keyword arguments are evaluated in order: the draws' order is fixed)
    drawn = replace(
        drawn,
        vignetting=float(g.uniform(0.05, 0.3)) if g.random() < 0.5 else 0.0,
        thickness_cv=float(g.uniform(0.0, 0.2)),
        channel_shift_px=float(g.uniform(0.1, 0.8)) if g.random() < 0.3 else 0.0,
        nuclear_stain="haematoxylin" if g.random() < 0.3 else "iron-haematoxylin",
    )
    return replace(drawn, **fixed)  # type: ignore[arg-type]


def write_pyramid_tiff(
    path: Path, rgb: np.ndarray, mpp: float, *, tile: int = 256, quality: int = 90,
    min_level_px: int = 512, compression: str = "jpeg",
) -> None:
    """Write a tiled pyramidal TIFF (levels as SubIFDs) with resolution tags in µm/px.

    Parameters
    ----------
    path : Path
    rgb : ndarray of uint8, shape (H, W, 3)
    mpp : float
        µm per pixel of level 0, stored as pixels per centimetre.
    tile : int
        Tile edge, a multiple of 16.
    quality : int
        JPEG quality when ``compression="jpeg"``.
    min_level_px : int
        Stop adding levels when the shorter side would fall below this.
    compression : str
        tifffile compression name (``"jpeg"``, ``"zlib"``, ``"lzw"``, ``"none"``).
    """
    import tifffile

    levels = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_level_px:
        prev = levels[-1]
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2),
                                 interpolation=cv2.INTER_AREA))
    opts: dict[str, Any] = {"tile": (tile, tile), "photometric": "rgb",
                               "compression": None if compression == "none" else compression}
    if compression == "jpeg":
        opts["compressionargs"] = {"level": quality}
    path.parent.mkdir(parents=True, exist_ok=True)
    ppcm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=rgb.size > 2**31) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(ppcm, ppcm),
                 resolutionunit="CENTIMETER", **opts)
        for i, lev in enumerate(levels[1:], start=1):
            r = ppcm / 2**i
            tw.write(lev, subfiletype=1, resolution=(r, r), resolutionunit="CENTIMETER", **opts)


def save_truth(path_stem: Path, truth: Truth) -> None:
    """Save truth masks (``.truth.npz``, not an image a slide search would pick up) and JSON."""
    Path(path_stem).parent.mkdir(parents=True, exist_ok=True)
    masks: dict[str, Any] = {"collagen": truth.collagen_mask, "tissue": truth.tissue_mask}
    if truth.bubble_mask is not None and truth.bubble_mask.any():
        masks["bubble"] = truth.bubble_mask
    np.savez_compressed(f"{path_stem}.truth.npz", **masks)
    info = {
        "cpa_percent": truth.cpa_percent,
        "tissue_area_mm2": truth.tissue_area_mm2,
        "collagen_area_mm2": truth.collagen_area_mm2,
        "bubble_area_mm2": truth.bubble_area_mm2,
        "params": asdict(truth.params),
        "stain_vectors": truth.stains.to_dict(),
    }
    Path(f"{path_stem}.truth.json").write_text(json.dumps(info, indent=2))


def make_cohort(
    out_dir: Path,
    *,
    stain: StainName = "sirius-red",
    groups: tuple[str, ...] = ("control", "MSC"),
    mice_per_group: int = 4,
    sections_per_mouse: int = 1,
    reduction: float = 0.4,
    shape: tuple[int, int] = (1536, 1536),
    mpp: float = 0.5,
    confound: float = 1.0,
    rng: int | np.random.Generator | None = 0,
) -> pd.DataFrame:
    """Write a synthetic study: slides, ``samples.csv`` and ``truth.csv``.

    Parameters
    ----------
    out_dir : Path
        Created if needed; slides are tiled pyramidal JPEG TIFFs with resolution tags.
    stain : str
        ``"sirius-red"``, ``"masson"`` or ``"masson-light-green"``.
    groups : tuple of str
        The first is the control group; the others get ``reduction`` less fibrosis.
    mice_per_group, sections_per_mouse : int
    reduction : float
        Relative reduction of the fibrosis amount in treated groups (0.4 = 40 % less).
    shape : tuple of int
        Slide size in pixels; ``mpp`` µm per pixel.
    confound : float
        Collagen-stain intensity of treated slides relative to control (0.7 = stained 30 %
        weaker on another day), for the batch-confounding test.
    rng : int or Generator, optional

    Returns
    -------
    pandas.DataFrame
        The truth table (also written as ``truth.csv``).
    """
    import pandas as pd

    g = _rng(rng)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for gi, group in enumerate(groups):
        for m in range(1, mice_per_group + 1):
            mouse = f"{group}-M{m:02d}"
            fib = float(g.uniform(0.55, 0.95)) * (1.0 - reduction if gi else 1.0)
            for s in range(1, sections_per_mouse + 1):
                seed = int(g.integers(0, 2**31))
                # anatomy fixed across the study so that fibrosis drives CPA; staining and
                # imaging vary slide by slide
                params = random_params(seed, stain=stain, shape=shape, mpp=mpp, fibrosis=fib,
                                       field_of_view=False, lobule_um=400.0,
                                       septum_width_um=12.0)
                if gi:
                    params = replace(params,
                                     collagen_intensity=params.collagen_intensity * confound)
                rgb, truth = make_section(params, rng=seed)
                name = f"{mouse}_s{s}.tif"
                write_pyramid_tiff(out_dir / name, rgb, mpp, quality=90)
                rows.append({
                    "slide": name, "mouse": mouse, "group": group,
                    "truth_cpa_percent": truth.cpa_percent,
                    "truth_tissue_area_mm2": truth.tissue_area_mm2,
                    "truth_collagen_area_mm2": truth.collagen_area_mm2,
                    "collagen_intensity": params.collagen_intensity,
                    "seed": seed,
                })
                save_truth(out_dir / "truth" / Path(name).stem, truth)
    truth_df = pd.DataFrame(rows)
    truth_df[["slide", "mouse", "group"]].to_csv(out_dir / "samples.csv", index=False)
    truth_df.to_csv(out_dir / "truth" / "truth.csv", index=False)
    return truth_df


# --- simulated annotators (people's masks drawn from the truth) ----------------------------

#: Edge habits of three simulated people: grows edges, shrinks them, wobbles them (µm).
ANNOTATOR_HABITS: dict[str, tuple[str, float]] = {
    "wide": ("dilate", 1.0), "tight": ("erode", 1.0), "jitter": ("jitter", 1.5)}


def annotator_mask(
    collagen_mask: np.ndarray, habit: str, amount_um: float, *, mpp: float,
    rng: int | np.random.Generator | None = None,
) -> np.ndarray:
    """One simulated person's dense collagen mask (bool) from the true one.

    ``dilate`` / ``erode`` move every edge out / in by ``amount_um``; ``jitter`` moves edges
    by a smooth random amount of SD ``amount_um`` (correlation length 5 µm), as a hand
    following a boundary does. The masks are exact functions of the truth's signed distance.
    """
    truth = np.asarray(collagen_mask, bool)
    inside = ndi.distance_transform_edt(truth) * mpp
    outside = ndi.distance_transform_edt(~truth) * mpp
    signed = np.where(truth, inside - 0.5 * mpp, -(outside - 0.5 * mpp))  # µm, > 0 inside
    if habit == "dilate":
        return signed > -amount_um
    if habit == "erode":
        return signed > amount_um
    if habit == "jitter":
        noise = _smooth_noise(truth.shape, 5.0 / mpp, _rng(rng))
        return signed + amount_um * noise > 0
    msg = f"habit must be 'dilate', 'erode' or 'jitter', got {habit!r}"
    raise ValueError(msg)


def simulated_annotators(
    collagen_mask: np.ndarray, *, mpp: float, rng: int | np.random.Generator | None = None,
    habits: dict[str, tuple[str, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Dense masks of several simulated people (:data:`ANNOTATOR_HABITS` by default)."""
    g = _rng(rng)
    return {name: annotator_mask(collagen_mask, habit, amount, mpp=mpp, rng=g)
            for name, (habit, amount) in (habits or ANNOTATOR_HABITS).items()}


def sparse_strokes(
    collagen_mask: np.ndarray, tissue_mask: np.ndarray, *, mpp: float, n_strokes: int = 40,
    width_um: float = 4.0, length_um: float = 30.0,
    rng: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Sparse label image (uint8: 0 not labelled, 1 not collagen, 2 collagen) of strokes.

    Half of the strokes start on collagen and half on other tissue, as a person labelling a
    few examples of each class would; each stroke is a short line of ``width_um``, kept to
    pixels of the class it started on (people stroke inside a structure, not across it).
    """
    g = _rng(rng)
    truth = np.asarray(collagen_mask, bool)
    other = np.asarray(tissue_mask, bool) & ~truth
    labels = np.zeros(truth.shape, np.uint8)
    for cls, pool, value in ((True, truth, 2), (False, other, 1)):
        ys, xs = np.nonzero(pool)
        if ys.size == 0:
            continue
        n = n_strokes // 2 + (n_strokes % 2 if cls else 0)
        for i in g.choice(ys.size, size=min(n, ys.size), replace=False):
            ang = g.uniform(0, np.pi)
            half = 0.5 * length_um / mpp
            p0 = (int(xs[i] - half * np.cos(ang)), int(ys[i] - half * np.sin(ang)))
            p1 = (int(xs[i] + half * np.cos(ang)), int(ys[i] + half * np.sin(ang)))
            stroke = np.zeros(truth.shape, np.uint8)
            cv2.line(stroke, p0, p1, 1, thickness=max(round(width_um / mpp), 1))
            keep = (stroke > 0) & pool
            labels[keep & (labels == 0)] = value
    return labels


# ------------------------------------------------------------------------------------------
# Cohorts and tissues for "right on real tissue" (issue 21): purple Masson parenchyma, diffuse
# pale collagen bands, heart/skeletal muscle without folds, small crops and H&E sections.
# ------------------------------------------------------------------------------------------


def purple_masson_params(seed: int, shape: tuple[int, int] = (768, 768)) -> SectionParams:
    """A random under-differentiated Masson section: the cytoplasm's stain is 25-45 % aniline
    blue (its counterstain carries that share of collagen-dye direction, varying from cell to
    cell), with fibrosis, fibres, stain strength, blur and JPEG drawn as on real slides.

    Parameters
    ----------
    seed : int
        The same seed gives the same parameters (and, as ``rng`` of :func:`make_section`, the
        same section).
    shape : tuple of int
        Image shape, pixels at 0.5 µm/px.

    Returns
    -------
    SectionParams
    """
    g = np.random.default_rng([21, seed])
    share = g.uniform(0.25, 0.45)  # aniline blue's share of the purple cytoplasm
    return SectionParams(
        stain="masson", shape=shape, fibrosis=float(g.uniform(0.1, 0.9)),
        fine_fibres=float(g.uniform(0.2, 0.6)), counterstain_od=float(g.uniform(0.35, 0.6)),
        nonspecific=float(g.uniform(0.01, 0.04)), cytoplasm_blue=float(share / (1.0 - share)),
        cytoplasm_blue_cv=float(g.uniform(0.1, 0.25)), stain_intensity=float(g.uniform(0.8, 1.2)),
        collagen_intensity=float(g.uniform(0.8, 1.2)), blur_um=float(g.uniform(0.0, 0.5)),
        jpeg_quality=int(g.choice([85, 90, 95])), vector_drift_deg=float(g.uniform(0.0, 4.0)),
        field_of_view=bool(g.random() < 0.3),
    )


def with_pale_band(
    rgb: np.ndarray, truth: Truth, *, width_um: float = 80.0, collagen_od: float = 0.2,
    rng: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, Truth]:
    """Add a diffuse pale collagen band through a section: a broad, wavy band of faint
    collagen stain laid over the cells (early fibrosis spreading through the parenchyma).

    The band's collagen stain (``collagen_od`` with a little texture, OD units, a fraction of
    a septum's) is added by Beer-Lambert: the image is dimmed by ``10^-(c · v)`` with the
    section's own collagen-stain vector. Truth: the band's tissue is collagen.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    truth : Truth
        From :func:`make_section` (without JPEG, which would have been applied after).
    width_um : float
        Band width, µm.
    collagen_od : float
        Collagen-stain concentration in the band, OD units.
    rng : int or numpy.random.Generator, optional

    Returns
    -------
    rgb, truth
        The image with the band and the truth with it in ``collagen_mask``.
    """
    g = _rng(rng)
    h, w = rgb.shape[:2]
    um = 1.0 / truth.params.mpp
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = g.uniform(0, np.pi)
    # a line through the middle third, bent by smooth noise
    cy, cx = h * g.uniform(0.35, 0.65), w * g.uniform(0.35, 0.65)
    d = (yy - cy) * np.cos(ang) - (xx - cx) * np.sin(ang)
    d += 30 * um * _smooth_noise((h, w), 60 * um, g)
    band = (np.abs(d) < 0.5 * width_um * um) & truth.tissue_mask
    texture = np.exp(0.15 * _smooth_noise((h, w), 2 * um, g)).astype(np.float32)
    conc = np.where(band, np.float32(collagen_od) * texture, 0).astype(np.float32)
    vec = truth.stains.vectors[truth.stains.collagen_index].astype(np.float32)
    dim = np.power(np.float32(10.0), -(conc[..., None] * vec))
    out = np.clip(np.rint(rgb.astype(np.float32) * dim), 0, 255).astype(np.uint8)
    return out, replace(truth, collagen_mask=truth.collagen_mask | band)


def make_muscle(
    *, stain: StainName = "masson", shape: tuple[int, int] = (768, 768), mpp: float = 0.5,
    collagen_share: float = 0.05, darker: float = 0.3,
    rng: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, Truth]:
    """A field of heart or skeletal muscle without folds, with known interstitial collagen.

    Parallel fibres (myocytes, ~15 µm wide, gently wavy) carry a dense counterstain (ponceau
    in Masson, picric acid in Sirius red) that varies smoothly by ``±darker`` over ~150 µm:
    evenly stained, slightly darker regions that are *not* folds. Between fibres, thin
    interstitial collagen (and, where ``collagen_share`` asks for more, perivascular patches)
    and a few empty clefts (glass). Nuclei lie along the fibres. A microscope field: the
    tissue fills the frame.

    Parameters
    ----------
    stain : {"masson", "sirius-red", "masson-light-green"}
    shape : tuple of int
    mpp : float
        µm per pixel.
    collagen_share : float
        Rough share of the tissue that is collagen, 0-0.3.
    darker : float
        Amplitude of the smooth counterstain variation (0.3 = ±30 %).
    rng : int or numpy.random.Generator, optional

    Returns
    -------
    rgb : ndarray of uint8, shape (H, W, 3)
    truth : Truth
        No lumen, capsule, fold or bubble; ``tissue_mask`` excludes the clefts.
    """
    g = _rng(rng)
    h, w = shape
    um = 1.0 / mpp
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = g.uniform(0, np.pi)
    across = (yy * np.cos(ang) - xx * np.sin(ang)) + 8 * um * _smooth_noise((h, w), 80 * um, g)
    period = 15.0 * um * (1 + 0.15 * _smooth_noise((h, w), 40 * um, g))
    phase = np.mod(across / period, 1.0)
    gap = np.minimum(phase, 1 - phase) * period  # distance to the nearest fibre boundary, px
    inter = gap < np.maximum(0.8 * um, 1.0)  # interstitium ~1.5 µm wide
    cleft = inter & (_smooth_noise((h, w), 20 * um, g) > 1.2)  # empty clefts (glass)
    extra = max(collagen_share - float(inter.mean()) * 0.6, 0.0)
    patches = _smooth_noise((h, w), 25 * um, g) > _gauss_quantile(1.0 - extra)
    collagen = ((inter & (_smooth_noise((h, w), 10 * um, g) > -0.25)) | patches) & ~cleft
    fibre = ~inter & ~patches
    shade = (1.0 + darker * np.tanh(_smooth_noise((h, w), 150 * um, g))).astype(np.float32)
    striation = 1.0 + 0.08 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / (2 * um))
    counter = np.where(fibre, 0.7 * shade * striation, 0.0).astype(np.float32)
    counter *= np.exp(0.1 * g.standard_normal((h, w))).astype(np.float32)
    coll = np.where(collagen, 0.55 * np.exp(0.2 * _smooth_noise((h, w), 2 * um, g)), 0.0)
    nuclei = np.zeros((h, w), bool)
    n_nuc = max(int(h * w / (40 * um) ** 2), 1)
    seeds = np.zeros((h, w), bool)
    seeds[g.integers(0, h, n_nuc), g.integers(0, w, n_nuc)] = True
    nuclei = (ndi.distance_transform_edt(~seeds) < 2.5 * um) & fibre
    nuc = np.where(nuclei, 0.6, 0.0)
    conc = np.stack([coll, counter, nuc], axis=-1).astype(np.float32)
    base = preset(stain)
    stains = StainMatrix(base.names, base.vectors, (246.0, 244.0, 240.0))
    intensity = np.asarray(stains.background_rgb, np.float32) * np.power(
        np.float32(10.0), -mix(conc, stains))
    intensity += g.standard_normal(intensity.shape).astype(np.float32) * 1.5
    rgb = np.clip(np.rint(intensity), 0, 255).astype(np.uint8)
    none = np.zeros((h, w), bool)
    params = SectionParams(stain=stain, shape=shape, mpp=mpp, field_of_view=True)
    tissue = ~cleft
    truth = Truth(params, stains, tissue, collagen & tissue, none, none, np.ones((h, w), bool),
                  none, none)
    return rgb, truth


def _gauss_quantile(q: float) -> float:
    """Quantile of the standard normal distribution (for thresholds of unit-SD fields)."""
    from scipy.stats import norm

    return float(norm.ppf(min(max(q, 1e-9), 1 - 1e-9)))


def small_crop(
    params: SectionParams | None = None, *, shape: tuple[int, int] = (200, 240),
    mpp: float = 0.25, rng: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, Truth]:
    """A small high-magnification crop (default 200 x 240 px at 0.25 µm/px: 3,000 µm²,
    under the default speck size of 5,000 µm²) of a field with known collagen.

    The field is drawn 4x larger and cropped where it holds collagen, so the crop shows a
    septum or fibres as a 40x crop around a feature would.
    """
    p = replace(params or SectionParams(fibrosis=0.8, fine_fibres=0.5, lobule_um=120.0),
                shape=(4 * shape[0], 4 * shape[1]), mpp=mpp, field_of_view=True)
    g = _rng(rng)
    rgb, truth = make_section(p, rng=g)
    frac = ndi.uniform_filter(truth.collagen_mask.astype(np.float32), size=shape)
    cy0, cy1 = shape[0] // 2, p.shape[0] - shape[0] + shape[0] // 2
    cx0, cx1 = shape[1] // 2, p.shape[1] - shape[1] + shape[1] // 2
    inner = frac[cy0:cy1, cx0:cx1]
    holes = ndi.uniform_filter((~truth.tissue_mask).astype(np.float32), size=shape)
    # a crop with some collagen, not the densest (5-25 % when there is such a place), and
    # without a lumen (a crop is taken around collagen, not around a vessel)
    want = np.clip(inner, 0, 0.25) - 10.0 * holes[cy0:cy1, cx0:cx1]
    iy, ix = np.unravel_index(int(np.argmax(want + 1e-3 * g.random(want.shape))), want.shape)
    y0, x0 = iy, ix
    sl = (slice(y0, y0 + shape[0]), slice(x0, x0 + shape[1]))
    crop = np.ascontiguousarray(rgb[sl])
    cut = {k: getattr(truth, k)[sl] for k in ("tissue_mask", "collagen_mask", "lumen_mask",
                                               "capsule_mask", "section_mask", "bubble_mask",
                                               "fold_mask")}
    return crop, replace(truth, params=replace(p, shape=shape), **cut)


def make_he_section(
    *, shape: tuple[int, int] = (768, 768), mpp: float = 0.5, eosin_od: float = 0.35,
    field_of_view: bool = False, rng: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, Truth]:
    """A haematoxylin and eosin section (not a collagen stain): the anatomy of
    :func:`make_section` drawn with eosin (cytoplasm pink, collagen a deeper pink) and
    haematoxylin (blue-purple nuclei) as real H&E shows them
    (:data:`fibroquant.stains.H_AND_E_REAL`). For wrong-stain tests; the truth's collagen is
    the anatomy's, which no collagen stain shows here.
    """
    from fibroquant.stains import H_AND_E_REAL

    g = _rng(rng)
    p = SectionParams(shape=shape, mpp=mpp, field_of_view=field_of_view, fibrosis=0.5)
    _, truth = make_section(replace(p, noise_sd=0.0), rng=g)
    h, w = shape
    um = 1.0 / mpp
    tissue = truth.section_mask & ~truth.lumen_mask
    eos = np.where(tissue, eosin_od * (1 + 0.25 * _smooth_noise((h, w), 3 * um, g)), 0.0)
    eos = np.where(truth.collagen_mask | truth.capsule_mask, 1.6 * eos, eos)
    seeds = np.zeros((h, w), bool)
    n_nuc = max(int(tissue.sum() / (20 * um) ** 2), 1)
    seeds[g.integers(0, h, n_nuc), g.integers(0, w, n_nuc)] = True
    nuclei = (ndi.distance_transform_edt(~seeds) < 3.0 * um) & tissue
    haem = np.where(nuclei, 0.5 * (0.8 + 0.4 * g.random((h, w))), 0.05 * tissue)
    conc = np.clip(np.stack([eos, haem], axis=-1), 0, None).astype(np.float32)
    stains = StainMatrix(H_AND_E_REAL.names, H_AND_E_REAL.vectors, (246.0, 244.0, 240.0))
    intensity = np.asarray(stains.background_rgb, np.float32) * np.power(
        np.float32(10.0), -mix(conc, stains))
    intensity += g.standard_normal(intensity.shape).astype(np.float32) * 1.5
    rgb = np.clip(np.rint(intensity), 0, 255).astype(np.uint8)
    return rgb, replace(truth, stains=stains)
