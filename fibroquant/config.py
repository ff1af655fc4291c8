"""Typed settings: built-in defaults < YAML file < command-line options.

Every stage receives only its own sub-model (:class:`TissueSettings`, :class:`StainSettings`,
:class:`CollagenSettings`, :class:`TilingSettings`). Models are frozen and forbid unknown keys, so a
typo in a YAML file is an error (``tissue.lumen_min_area_um2: extra inputs are not permitted``),
never a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fibroquant.errors import ConfigError
from fibroquant.exclusions import detected
from fibroquant.protocols import STAIN_NAMES, Stain

#: Bumped whenever a change to the algorithms changes measurements. It is part of the settings
#: hash, so stored results made by an older algorithm are re-measured instead of being mixed in.
ALGORITHM_VERSION = 4


class _Model(BaseModel):
    # NaN and infinity are refused as numbers ("should be a finite number"), not compared
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TissueSettings(_Model):
    """Tissue detection and exclusions (computed on a low-resolution thumbnail)."""

    tissue_mpp: float | None = Field(
        None, gt=0, description="µm/px of the tissue-detection image; None = automatic"
    )
    max_thumbnail_mpx: float = Field(
        4.0, gt=0, le=256, description="largest tissue-detection image, megapixels"
    )
    glass_od: float | None = Field(
        None, gt=0, description="summed optical density above which a pixel is tissue; None = Otsu"
    )
    glass_od_min: float = Field(0.03, gt=0, description="lower clip of the automatic glass OD")
    glass_od_max: float = Field(0.1, gt=0, description="upper clip of the automatic glass OD")
    pale_tissue_sd: float = Field(
        8.0, ge=0, description="with an automatic glass OD: tissue grows from above it into "
        "connected, coloured (not grey) pixels above the glass level + this many robust SDs of "
        "the glass (pale, barely counterstained parenchyma), never below glass_od_min; 0 = off"
    )
    flat_field: bool = Field(
        True, description="divide out uneven illumination (vignetting) seen on glass and empty spaces"
    )
    flat_field_min_od: float = Field(
        0.02, gt=0, description="least range of the illumination field that is corrected, OD"
    )
    register_channels: bool = Field(
        True, description="move the red and blue planes back onto the green one when the camera "
        "misregisters them (coloured fringes at vacuole and lumen edges)"
    )
    smooth_um: float = Field(
        1.5, ge=0, description="median filter before the glass threshold: 5 px if >= 1.5 px, µm"
    )
    min_tissue_area_um2: float = Field(
        5000.0, ge=0, description="tissue pieces smaller than this are dust/debris, µm²"
    )
    lumen_min_area_um2: float = Field(
        1200.0, ge=0, description="unstained holes at least this large are lumens (excluded), µm²"
    )
    lumen_max_area_um2: float = Field(
        60000.0, gt=0,
        description="glass cut by the image frame up to this size is a lumen, not outer glass, µm²",
    )
    exclude_capsule: bool = Field(True, description="leave the Glisson capsule band out")
    capsule_width_um: float = Field(
        30.0, ge=0, description="widest capsule: edge band searched for surface collagen, µm"
    )
    exclude_folds: bool = Field(True, description="leave tissue folds (double thickness) out")
    fold_od_factor: float = Field(
        1.8, gt=1, description="parenchyma's counterstain above this multiple of its median "
        "starts a fold (a double layer: ~2x)"
    )
    fold_min_area_um2: float = Field(
        1000.0, ge=0, description="smallest area above fold_od_factor that starts a fold, µm²")
    exclude_unfocused: bool = Field(
        True, description="leave out tiles far blurrier than the rest of the slide"
    )
    unfocused_factor: float = Field(
        0.3, gt=0, lt=1,
        description="a tile is out of focus below this fraction of the median tile sharpness",
    )
    exclude_vessel_walls_above_um2: float | None = Field(
        None, gt=0, description="if set, collagen rings around lumens larger than this are excluded"
    )
    vessel_wall_um: float = Field(
        25.0, gt=0, description="ring width around large lumens treated as wall, µm"
    )
    exclude_bubbles: bool = Field(
        True, description="leave out air bubbles (round regions inside a dark grey rim)"
    )
    bubble_min_area_um2: float = Field(
        1000.0, ge=0, description="smallest bubble, rim included, µm²"
    )
    bubble_max_area_um2: float = Field(
        5e6, gt=0, description="largest bubble, rim included, µm²"
    )
    bubble_rim_od: float = Field(
        0.45, gt=0,
        description="least grey optical density of a rim pixel (the smallest of its R, G, B OD)",
    )
    bubble_rim_chroma: float = Field(
        0.3, gt=0, le=1,
        description="largest colour of a rim pixel: spread of its R, G, B OD over their sum "
        "(0 = grey; stains alone are 0.4-0.8)",
    )
    bubble_rim_max_um: float = Field(
        15.0, gt=0, description="widest rim: dark grey bands wider than this are not rims, µm"
    )
    bubble_contrast_od: float = Field(
        0.25, gt=0,
        description="rim at least this much darker (median grey OD) than both the inside and "
        "the outside of the bubble",
    )


class StainSettings(_Model):
    """Colour deconvolution and per-slide stain estimation."""

    stain: Stain = Stain.SIRIUS_RED
    masson_collagen: Literal["aniline-blue", "light-green"] = "aniline-blue"
    estimate: Literal["anchored", "preset"] = Field(
        "anchored", description="per-slide vectors anchored to the preset, or the preset as is"
    )
    max_angle_deg: float = Field(
        25.0, gt=0, le=60, description="largest accepted change of a vector from its preset, deg"
    )
    od_floor: float = Field(
        0.15, gt=0, description="pixels with a smaller OD norm do not inform stain estimation"
    )
    min_share: float = Field(
        0.6, gt=0, lt=1, description="a stain's share of a pixel's OD to count it as that stain's"
    )
    sample_pixels: int = Field(
        150_000, gt=1000, description="tissue pixels sampled to calibrate a slide"
    )
    background_rgb: tuple[
        Annotated[float, Field(gt=0, le=255)], Annotated[float, Field(gt=0, le=255)],
        Annotated[float, Field(gt=0, le=255)],
    ] | None = Field(
        None, description="glass intensity (R, G, B), each in (0, 255]; None = estimated per slide"
    )
    vectors: dict[str, tuple[float, float, float]] | None = Field(
        None, description="explicit study vectors by stain name (written by `fibroquant stains`)"
    )

    def stain_names(self) -> tuple[str, ...]:
        """Names of this protocol's stains, collagen stain first."""
        if self.stain == Stain.MASSON and self.masson_collagen == "light-green":
            return STAIN_NAMES["masson-light-green"]
        return STAIN_NAMES[self.stain.value]

    @model_validator(mode="after")
    def _vectors_of_this_protocol(self) -> StainSettings:
        # a config written for one stain used with another (``--stain``) stops before any work
        unknown = sorted(set(self.vectors or ()) - set(self.stain_names()))
        if unknown:
            msg = (f"vectors: stain(s) {', '.join(unknown)} are not stains of "
                   f"{self.stain.value} (expected {', '.join(self.stain_names())}); the config "
                   "was written for another stain")
            raise ValueError(msg)
        return self


class CollagenSettings(_Model):
    """Collagen segmentation on the collagen concentration channel."""

    method: Literal["relative", "fixed-od", "otsu"] = Field(
        "relative", description="threshold scale: per-slide relative, fixed OD, or Otsu"
    )
    relative_threshold: float = Field(
        0.2, gt=0, lt=1,
        description="fraction of the way from the slide's parenchyma level to its collagen level",
    )
    min_contrast_od: float = Field(
        0.08, ge=0, description="threshold at least this far above the parenchyma level, OD"
    )
    fixed_od: float = Field(0.25, gt=0, description="threshold for method fixed-od, OD units")
    local_background_um: float | None = Field(
        25.0, gt=0,
        description="relative method: follow non-specific uptake over this scale (Gaussian "
        "sigma, µm); None = one slide-wide parenchyma level",
    )
    min_share: float = Field(
        0.35, ge=0, lt=1,
        description="collagen stain's least share of a pixel's stain (purple mixtures are not "
        "collagen), as a fraction of the way from the share of the slide's parenchyma (see "
        "share_baseline) to pure collagen stain; 0 = concentration alone",
    )
    share_baseline: Literal["auto", "parenchyma", "zero"] = Field(
        "auto",
        description="where min_share is counted from: 'parenchyma' = the collagen-stain share "
        "the slide's own parenchyma carries (purple Masson cytoplasm), 'zero' = a pure "
        "counterstain; 'auto' = parenchyma for Masson with per-slide fitted vectors, else zero",
    )
    parenchyma_share_spread: float = Field(
        1.5, ge=1,
        description="share_baseline parenchyma: parenchyma cells carry up to this many times the "
        "median parenchymal collagen-stain share (cell-to-cell and zonal variation), at most 0.5",
    )
    pale_bands: bool = Field(
        True,
        description="relative method with local_background_um: find diffuse pale collagen "
        "(a broad band of faint collagen stain over cells, told from purple cytoplasm by its "
        "neighbourhood's share); there the share guard falls toward the parenchyma's (not "
        "below 0.3) and the threshold halfway to min_contrast_od above the local parenchyma",
    )
    min_object_area_um2: float = Field(
        5.0, ge=0, description="collagen specks smaller than this are dropped, µm²"
    )
    blob_max_area_um2: float | None = Field(
        None, ge=0,
        description="compact round collagen-coloured blobs up to this area are not collagen "
        "(Masson with a plain, blue-purple haematoxylin: nuclei read as aniline blue), µm²; "
        "0 = off (interstitial collagen patches are compact too); None = automatic: 80 µm² on "
        "an aniline-blue Masson slide whose nuclei are not iron haematoxylin (almost no pixel "
        "is mostly nuclear stain), else off",
    )


class TilingSettings(_Model):
    """Resolution and tile streaming. ``analysis_mpp`` and ``tile_px`` change measurements
    (``tile_px`` slightly: specks and blobs cut by a tile's edge are kept, and focus is judged
    per tile); the others do not."""

    analysis_mpp: float | None = Field(
        None, gt=0, le=10,
        description="µm/px the analysis runs at; None = native resolution (CPA of septa is "
        "stable to 1-2 µm/px, fine fibres need 0.5-1; coarser than 10 measures nothing useful)",
    )
    read_oversample: float = Field(
        2.0, ge=1, le=8,
        description="with analysis_mpp: read the coarsest pyramid level at least this many "
        "times finer and downsample it (a JPEG level at the analysis resolution has lost the "
        "colour of thin fibres: chroma is stored at half resolution); 1 = read the level at "
        "analysis_mpp itself",
    )
    tile_px: int = Field(1024, ge=128, le=8192, description="tile edge at analysis resolution")
    mask_max_mpx: float = Field(
        64.0, gt=0, le=1024, description="largest mask/overlay written; coarser above it, megapixels"
    )
    qc_max_px: int = Field(2000, ge=100, le=20000, description="longest side of QC overlays, px")
    input_timeout_s: float = Field(
        120.0, gt=0, le=86400,
        description="longest wait for a slide file to be fingerprinted or opened, seconds: a "
        "file on a hung network share (or anything that blocks) fails its row after it",
    )
    slide_timeout_s: float = Field(
        3600.0, gt=0, le=7 * 86400,
        description="longest one slide may take, seconds: a read that hangs mid-slide (a "
        "network share gone away) fails that slide; a worker process is replaced, a --workers "
        "1 run (measuring in its own process) ends and the next run records the slide",
    )
    zoom: bool | None = Field(
        False, description="write a zoomable full-resolution QC overlay (DeepZoom tiles and an "
        "OpenSeadragon page in zoom/); null = only for slides larger than qc_max_px, whose QC "
        "overlay is downscaled. Off by default: on a 1-GP slide it costs ~1.5x the analysis "
        "time and ~245 MB of tiles (benchmarks/README.md)",
    )


class TraitSettings(_Model):
    """Fibre architecture traits (:mod:`fibroquant.traits`); ``traits: false`` turns them off."""

    enabled: bool = Field(True, description="measure fibre traits and compartments")
    mpp: float = Field(
        1.0, gt=0, le=10,
        description="µm/px the traits are measured at (the collagen mask is majority-reduced "
        "to it; never finer than the mask); finer resolves thin fibres better but costs more",
    )
    thin_um: float = Field(3.0, gt=0, description="fibres thinner than this are thin (pericellular)")
    thick_um: float = Field(10.0, gt=0, description="fibres thicker than this are thick (septal)")
    ring_um: float = Field(50.0, ge=0, description="perivascular ring width around lumens")
    septum_min_width_um: float = Field(
        4.0, gt=0, description="local width of septal collagen (narrower is pericellular)")
    septum_min_length_um: float = Field(
        300.0, gt=0, description="skeleton length of wide fibre making an object septal "
        "without bridging two vessels (about a lobule's radius)")
    aggregate_um2: float = Field(5000.0, gt=0, description="objects above this are aggregated")
    tile_px: int = Field(1024, ge=64, le=8192, description="trait tile edge at the trait mpp")

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data


class ClusterSettings(_Model):
    """Where the slides run: a batch cluster's jobs (``--cluster``; never changes measurements).

    Each job is one Dask worker process of ``cores`` threads (one slide per thread) on a node;
    the run submits ``jobs`` of them through dask-jobqueue (see :mod:`fibroquant.cluster`).
    """

    kind: Literal["slurm", "pbs", "sge", "local"] | None = Field(
        None, description="batch system; --cluster overrides it; None = no cluster")
    cores: int = Field(4, ge=1, le=1024, description="cores (Dask threads) per job")
    memory: str = Field("16GB", min_length=2, description="memory per job, e.g. 16GB")
    walltime: str = Field("04:00:00", description="job time limit, HH:MM:SS")
    queue: str | None = Field(None, description="partition (SLURM) or queue (PBS/SGE)")
    account: str | None = Field(None, description="account / project charged")
    job_extra_directives: list[str] = Field(
        default_factory=list, description="extra #SBATCH/#PBS/#$ lines, e.g. ['--qos=long']")
    job_script_prologue: list[str] = Field(
        default_factory=list,
        description="shell lines run before the worker, e.g. ['module load python', "
        "'source ~/venvs/fibroquant/bin/activate']")
    jobs: int = Field(1, ge=1, le=10000, description="jobs (workers) to scale to")
    python: str | None = Field(
        None, description="python on the nodes (default: this one, found on a shared disk)")
    interface: str | None = Field(
        None, description="network interface workers and scheduler talk on, e.g. ib0")
    local_directory: str | None = Field(
        None, description="worker scratch folder on the node, e.g. $TMPDIR")
    log_directory: str | None = Field(None, description="folder for the jobs' stdout/stderr")


class Settings(_Model):
    """All settings of one analysis."""

    tissue: TissueSettings = TissueSettings()
    stains: StainSettings = StainSettings()
    collagen: CollagenSettings = CollagenSettings()
    tiling: TilingSettings = TilingSettings()
    traits: TraitSettings = TraitSettings()
    cluster: ClusterSettings = ClusterSettings()
    classifier: Path | None = Field(
        None, description="pixel classifier file (fibroquant train) that decides collagen "
        "instead of the threshold; its SHA-256 joins the settings hash")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.tissue.glass_od_min > self.tissue.glass_od_max:
            msg = "tissue.glass_od_min must not exceed tissue.glass_od_max"
            raise ValueError(msg)
        if self.classifier is not None:
            from fibroquant.classifier import check_compatible

            check_compatible(self.classifier, self.stains.stain_names())
        return self

    def share_from_parenchyma(self, counterstain_fitted: bool) -> bool:
        """Whether ``collagen.min_share`` is counted from the slide's parenchymal share.

        ``auto`` does so for Masson when the counterstain vector was fitted to the slide: with
        fixed (preset or study) vectors, collagen stain seen in the parenchyma may be a vector
        misfit rather than purple cytoplasm, and the collagen's own share is lowered too.
        """
        base = self.collagen.share_baseline
        return base == "parenchyma" or (
            base == "auto" and self.stains.stain == Stain.MASSON and counterstain_fitted
        )

    def measurement_dict(self) -> dict[str, Any]:
        """Settings that change measurements, as canonical JSON-able data."""
        data = self.model_dump(mode="json")
        data.pop("cluster")  # where slides run does not change what is measured
        clf = data.pop("classifier", None)  # absent by default: the default hash is unchanged
        if clf is not None:  # the file's content, not its name, changes measurements
            from fibroquant.classifier import file_hash

            data["classifier_sha256"] = file_hash(clf)
        mask_max_mpx = data["tiling"]["mask_max_mpx"]
        for key in ("mask_max_mpx", "qc_max_px", "input_timeout_s", "slide_timeout_s", "zoom"):
            data["tiling"].pop(key)
        data["traits"].pop("tile_px")
        if not data["traits"]["enabled"]:  # no trait measured: hashes as before traits existed
            data.pop("traits")
        else:  # the traits are measured on the kept masks, whose size it sets
            data["traits"]["mask_max_mpx"] = mask_max_mpx
        if data["tiling"]["analysis_mpp"] is None:  # native resolution: no level is chosen
            data["tiling"].pop("read_oversample")
        data["algorithm_version"] = ALGORITHM_VERSION
        if found := [c.key for c in detected()]:  # none by default: the default hash is unchanged
            data["detected_exclusions"] = found
        return data

    def settings_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the settings that change measurements."""
        text = json.dumps(self.measurement_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The setting names allowed where ``loc`` points (its parent section's fields)."""
    model: Any = Settings
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


_FRIENDLY = {
    "float_parsing": "expected a number", "float_type": "expected a number",
    "int_parsing": "expected a whole number", "int_type": "expected a whole number",
    "int_from_float": "expected a whole number", "bool_parsing": "expected true or false",
    "bool_type": "expected true or false", "string_type": "expected text",
    "dict_type": "expected a section of settings (key: value lines)",
    "list_type": "expected a list",
}


def _format_validation(error: ValidationError, source: str) -> str:
    """One line naming every bad ``section.key``, in plain words, with the closest known
    setting for a misspelt one."""
    import difflib

    parts = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        kind = item.get("type", "")
        if kind == "extra_forbidden":
            known = _fields_at(loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = (f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close
                    else f"; known here: {', '.join(known)}" if known else "")
            parts.append(f"{where}: unknown setting{hint}")
            continue
        if kind in _FRIENDLY:
            parts.append(f"{where}: {_FRIENDLY[kind]}, got {item.get('input')!r}")
            continue
        msg = str(item["msg"]).removeprefix("Value error, ")  # our own validators' text
        msg = msg.replace("Input should be", "should be")
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (YAML would silently
    keep the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_settings(
    path: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build settings from defaults, an optional YAML file and command-line overrides.

    Parameters
    ----------
    path : Path, optional
        YAML file whose keys mirror :class:`Settings` (``tissue:``, ``stains:``, ...).
    overrides : dict, optional
        Nested values from the command line; they win over the file.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        Unreadable YAML or invalid values, one message listing ``key.path: problem``.
    """
    data: dict[str, Any] = {}
    source = "settings"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"),
                               Loader=_UniqueKeyLoader)
        except FileNotFoundError:
            msg = f"{path}: config file not found"
            raise ConfigError(msg) from None
        except yaml.MarkedYAMLError as exc:  # where: line and column, 1-based
            mark = exc.problem_mark or exc.context_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            what = exc.problem or exc.context or "malformed YAML"
            msg = f"{path}{where}: not a readable YAML file ({what})"
            raise ConfigError(msg) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            msg = f"{path}: not a readable YAML file ({reason})"
            raise ConfigError(msg) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            msg = f"{path}: expected a mapping of sections (tissue:, stains:, ...)"
            raise ConfigError(msg)
        data = loaded
        if isinstance(data.get("classifier"), str) and not Path(data["classifier"]).is_absolute():
            data = {**data, "classifier": str(Path(path).parent / data["classifier"])}
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
