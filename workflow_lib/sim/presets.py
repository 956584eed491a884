"""Named survey presets: the size and content of the simulated survey."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class SimPreset:
    """Everything that sizes a simulated survey.

    ``visits`` lists ``(band, n_template, n_later)``: template-quality visits are
    taken before ``template_mjd_end`` with excellent seeing; the later ones
    start after ``explosion_mjd_min`` so that transients are absent from the
    templates.
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
    galaxy_density: float = 126_000.0  # galaxies per deg^2 with r < 25.5
    galaxy_slope: float = 0.33
    n_transients: int = 4
    n_hostless: int = 1
    n_variables: int = 6
    guaranteed_transients: int = 1  # bright transients forced onto later r visits
    refcat_mag_limit: float = 22.0  # r band
    cr_rate: float = 1.5e-6  # cosmic rays per pixel per second

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
}


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
