"""Named survey presets: the size and content of the simulated survey."""

from __future__ import annotations

from dataclasses import dataclass, replace

# LSST-like photometry: AB magnitude giving 1 e-/s, and dark-sky brightness
# (mag/arcsec^2), per band.
ZERO_POINTS: dict[str, float] = {
    "u": 27.0,
    "g": 28.5,
    "r": 28.36,
    "i": 28.17,
    "z": 27.8,
    "y": 26.8,
}
DARK_SKY: dict[str, float] = {
    "u": 22.9,
    "g": 22.3,
    "r": 21.2,
    "i": 20.5,
    "z": 19.6,
    "y": 18.6,
}
# Effective wavelength (nm), for the diffraction part of the PSF.
WAVELENGTH_NM: dict[str, float] = {
    "u": 368.0,
    "g": 480.0,
    "r": 622.0,
    "i": 754.0,
    "z": 869.0,
    "y": 971.0,
}
BAND_ORDER = "ugrizy"
RAW_DTYPES = ("int32", "uint16", "float32")
OBSTYPE_KEYWORDS = ("OBSTYPE", "IMGTYPE")


@dataclass(frozen=True)
class SimPreset:
    """Everything that sizes a simulated survey.

    ``visits`` lists ``(band, n_template, n_later)``: template-quality visits are
    taken before ``template_mjd_end`` with excellent seeing
    (``template_seeing``); the later ones (``later_seeing``) start after
    ``explosion_mjd_min`` so that transients are absent from the templates.

    Camera knobs (their defaults are the original LSSTCam-like camera):
    ``rotation_offset_deg`` is added to every science visit's sky rotation;
    ``parity_flip`` mirrors the detector x axis on the sky (true and header
    WCS then have the parity opposite to the sky's: det(CD) > 0, east to the
    right); ``raw_dtype`` is the numpy type of the raw amplifier pixels
    (``uint16`` cameras get DECam-like gains of 2.7-5.4 e-/ADU and bias levels
    so that SATURATE fits in 16 bits; ``float32`` raws are not rounded);
    ``obstype_keyword`` names the primary keyword that carries the exposure
    type (``OBSTYPE`` files also carry the ``IMGTYPE`` alias, as they always
    did; ``IMGTYPE`` files carry only ``IMGTYPE``). The header WCS is off by a
    pointing error of ``header_wcs_offset_arcsec`` rms per axis per exposure
    (plus a quarter of that per detector) and a rotation error whose size is
    uniform in ``header_wcs_rotation_deg`` with a random sign.
    """

    name: str
    n_det_x: int
    n_det_y: int
    det_nx: int
    det_ny: int
    n_amp_x: int  # amplifiers per row; there are always two rows
    visits: tuple[tuple[str, int, int], ...]
    prescan: int = 8
    overscan: int = 32
    gap_px: int = 100
    pixel_scale: float = 0.2  # arcsec / pixel
    exptime: float = 30.0
    ra0: float = 56.0
    dec0: float = -31.0
    dither_frac: float = 0.12  # of the focal-plane width
    rot_max_deg: float = 1.5
    distortion_edge_px: float = 3.0  # radial distortion at the focal-plane corner
    survey_mjd_start: float = 60620.0
    template_mjd_end: float = 60630.0
    explosion_mjd_min: float = 60632.0
    survey_mjd_end: float = 60680.0
    n_bias: int = 3
    n_dark: int = 3
    dark_exptime: float = 60.0
    n_flat: int = 3
    flat_level: float = 30000.0  # e- per pixel
    star_density: float = 150_000.0  # stars per deg^2 with 15 < r < 25
    star_slope: float = 0.12  # dlog10 N / dm (flat: a low-latitude field)
    galaxy_density: float = 126_000.0  # galaxies per deg^2 with 17.5 < r < galaxy_mag_max
    galaxy_slope: float = 0.33
    galaxy_mag_max: float = 25.5  # galaxies are drawn on [17.5, galaxy_mag_max]
    n_transients: int = 4
    n_hostless: int = 1
    n_variables: int = 6
    guaranteed_transients: int = 1  # bright transients forced onto later r visits
    refcat_mag_limit: float = 22.0  # r band
    cr_rate: float = 1.5e-6  # cosmic rays per pixel per second
    # Atmospheric seeing FWHM (arcsec), uniform in these ranges.
    template_seeing: tuple[float, float] = (0.48, 0.6)
    later_seeing: tuple[float, float] = (0.68, 1.2)
    # Camera knobs (see the class docstring).
    rotation_offset_deg: float = 0.0
    parity_flip: bool = False
    raw_dtype: str = "int32"
    obstype_keyword: str = "OBSTYPE"
    header_wcs_offset_arcsec: float = 4.0  # rms per axis per exposure
    header_wcs_rotation_deg: tuple[float, float] = (0.1, 0.3)  # |error| range

    def __post_init__(self) -> None:
        problems = []
        if self.det_nx % self.n_amp_x or self.det_ny % 2:
            problems.append(
                f"a {self.det_nx}x{self.det_ny} detector cannot be split into "
                f"2 x {self.n_amp_x} equal amplifiers"
            )
        if min(self.det_nx, self.det_ny) < 128:
            problems.append("detectors need at least 128 pixels a side")
        if self.raw_dtype not in RAW_DTYPES:
            problems.append(f"raw_dtype must be one of {', '.join(RAW_DTYPES)}")
        if self.obstype_keyword not in OBSTYPE_KEYWORDS:
            problems.append(f"obstype_keyword must be one of {', '.join(OBSTYPE_KEYWORDS)}")
        if not 0.0 <= self.header_wcs_offset_arcsec <= 30.0:
            problems.append("header_wcs_offset_arcsec must be in [0, 30]")
        lo, hi = self.header_wcs_rotation_deg
        if not 0.0 <= lo <= hi <= 2.0:
            problems.append("header_wcs_rotation_deg must be (lo, hi) with 0 <= lo <= hi <= 2")
        for name in ("template_seeing", "later_seeing"):
            lo, hi = getattr(self, name)
            if not 0.3 <= lo <= hi <= 3.0:
                problems.append(f"{name} must be (lo, hi) with 0.3 <= lo <= hi <= 3 arcsec")
        if not 17.5 < self.galaxy_mag_max <= 28.0:
            problems.append("galaxy_mag_max must be in (17.5, 28]")
        if self.pixel_scale <= 0:
            problems.append("pixel_scale must be positive")
        if problems:
            raise ValueError(f"simulation preset {self.name!r}: " + "; ".join(problems))

    @property
    def bands(self) -> tuple[str, ...]:
        """Simulated bands in ugrizy order."""
        present = {b for b, _, _ in self.visits}
        return tuple(b for b in BAND_ORDER if b in present)

    @property
    def n_detectors(self) -> int:
        return self.n_det_x * self.n_det_y

    @property
    def n_amps(self) -> int:
        return 2 * self.n_amp_x


_PRESETS: dict[str, SimPreset] = {
    "tiny": SimPreset(
        name="tiny",
        n_det_x=2,
        n_det_y=1,
        det_nx=512,
        det_ny=512,
        n_amp_x=2,
        overscan=16,
        gap_px=60,
        visits=(("g", 1, 1), ("r", 2, 4), ("i", 1, 1)),
        dither_frac=0.04,
        n_bias=3,
        n_dark=3,
        n_flat=3,
        n_transients=2,
        n_hostless=1,
        n_variables=3,
        guaranteed_transients=2,
    ),
    "default": SimPreset(
        name="default",
        n_det_x=2,
        n_det_y=2,
        det_nx=1024,
        det_ny=1024,
        n_amp_x=4,
        visits=(("g", 2, 4), ("r", 3, 7), ("i", 2, 4)),
        n_transients=6,
        n_hostless=1,
        n_variables=8,
        guaranteed_transients=2,
    ),
    # A high-latitude field seen by a DECam-like camera: galaxies ~30, 60 and
    # 110 per arcmin^2 brighter than r = 24, 25, 26; ~3 stars per arcmin^2
    # brighter than r = 24; 0.26" pixels; small non-square CCDs.
    "highlat": SimPreset(
        name="highlat",
        n_det_x=2,
        n_det_y=2,
        det_nx=768,
        det_ny=640,
        n_amp_x=2,
        pixel_scale=0.26,
        visits=(("g", 2, 3), ("r", 2, 5), ("i", 2, 2)),
        star_density=14_500.0,
        star_slope=0.12,
        galaxy_density=396_000.0,
        galaxy_slope=0.28,
        galaxy_mag_max=26.0,
        template_seeing=(0.5, 0.6),
        later_seeing=(0.7, 2.0),
        n_transients=5,
        n_hostless=1,
        n_variables=6,
        guaranteed_transients=2,
    ),
}


# The same sky on two small CCDs and 8 visits, for the tests.
_PRESETS["highlat_tiny"] = replace(
    _PRESETS["highlat"],
    name="highlat_tiny",
    n_det_x=2,
    n_det_y=1,
    det_nx=512,
    det_ny=448,
    overscan=16,
    gap_px=60,
    visits=(("g", 1, 1), ("r", 2, 2), ("i", 1, 1)),
    dither_frac=0.04,
    n_transients=2,
    n_variables=3,
)


def preset_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_preset`."""
    return tuple(_PRESETS)


def get_preset(name: str) -> SimPreset:
    """Return the preset called ``name``.

    Unknown names raise a ValueError that lists the known presets.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown simulation preset {name!r}; known presets: {', '.join(_PRESETS)}"
        ) from None


def register_preset(preset: SimPreset) -> None:
    """Make ``preset`` known to ``get_preset`` in this process (benchmarks, experiments).

    The workflow's configuration accepts only the built-in presets.
    """
    _PRESETS[preset.name] = preset
