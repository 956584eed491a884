"""Bit flags of the catalog ``flags`` columns (CONTRACT 2: documented bit masks).

Each measurement family has its own failure bit, as meas_base plugins set their
own ``<algo>_flag``. The README lists these tables; ``describe`` decodes a value.
"""

from __future__ import annotations

from enum import IntFlag


class CcdVisitFlag(IntFlag):
    """Outcome of processing one (visit, detector); FAILED means no calexp."""

    FAILED = 1 << 0  # no calexp was produced; see failReason
    BAD_IMAGE = 1 << 1  # all-NaN, all-saturated or otherwise unprocessable pixels
    PSF_FAILED = 1 << 2  # too few usable stars for a PSF model
    NO_REFERENCE_STARS = 1 << 3  # the reference catalog has no stars on this CCD
    ASTROMETRY_FAILED = 1 << 4  # no consistent match to the reference catalog, or a bad fit
    PHOTOCAL_FAILED = 1 << 5  # too few calibration stars for a zero point
    NO_BIAS = 1 << 6  # ISR ran without a master bias
    NO_DARK = 1 << 7  # ISR ran without a master dark
    NO_FLAT = 1 << 8  # ISR ran without a master flat
    PSF_REDUCED_ORDER = 1 << 9  # PSF spatial order lowered for lack of stars
    SIP_REDUCED_ORDER = 1 << 10  # WCS distortion order capped by too few or badly spread stars
    PSF_FALLBACK = 1 << 11  # too few clean stars: a parametric (Moffat) PSF was fitted


class SourceFlag(IntFlag):
    """Per-source measurement flags of the Source table."""

    CENTROID_FAILED = 1 << 0
    PSF_FLUX_FAILED = 1 << 1
    AP_FLUX_FAILED = 1 << 2
    EDGE = 1 << 3  # too close to the image edge for the PSF kernel
    SATURATED_CENTER = 1 << 4
    INTERPOLATED_CENTER = 1 << 5
    CR_CENTER = 1 << 6
    BAD_CENTER = 1 << 7
    APCORR_FAILED = 1 << 8
    USED_PSF = 1 << 9  # used to fit the PSF model
    USED_ASTROMETRY = 1 << 10  # used in the WCS fit
    USED_PHOTOCAL = 1 << 11  # used for the zero point
    BLENDED = 1 << 12  # a deblended child


class ObjectFlag(IntFlag):
    """Bits of the Object table's ``{band}_flags`` (bits 0-15) and ``flags`` (all bits).

    ``{band}_flags`` holds the measurement bits of that band's coadd; ``flags``
    holds the object-level bits (16 and up) OR-ed with the reference band's
    measurement bits, so ``flags == 0`` means a clean reference measurement.
    """

    NOT_DETECTED = 1 << 0  # no peak in this band: the measurement is forced only
    PSF_FLUX_FAILED = 1 << 1  # no usable PSF flux (off the coadd, masked, non-finite)
    AP_FLUX_FAILED = 1 << 2  # aperture truncated by the coadd edge or with masked pixels
    CENTROID_FAILED = 1 << 3  # this band's own (unforced) centroid failed
    EDGE = 1 << 4  # the PSF-fit stamp leaves the coadd
    NO_DATA_CENTER = 1 << 5  # NO_DATA or BAD pixel in the central 3x3
    MASKED = 1 << 6  # too much of the PSF-fit stamp is masked
    SATURATED_CENTER = 1 << 7  # SAT pixel in the central 3x3
    APCORR_FAILED = 1 << 8  # no aperture correction applied: an input's is unknown here, or
    # (inputs without any) too few stars to fit one on the coadd
    NO_COADD = 1 << 9  # no coadd of this band in the patch
    SHAPE_FAILED = 1 << 10  # windowed moments not positive-definite
    EXTENDEDNESS_FAILED = 1 << 11  # extendedness could not be decided
    DEBLEND_PARENT = 1 << 16  # a footprint with several peaks: measured undeblended
    DEBLEND_CHILD = 1 << 17  # one peak of a deblended parent, measured on its own pixels
    DEBLEND_SKIPPED = 1 << 18  # too many peaks or pixels: measured as one object
    REF_BAND_FALLBACK = 1 << 19  # no band passed the S/N cut; the reference band is a fallback


class ForcedSourceFlag(IntFlag):
    """Bits of the ForcedSource ``flags`` column (PSF flux at a fixed position)."""

    PSF_FLUX_FAILED = 1 << 0  # no usable flux (masked, off the image, non-finite)
    EDGE = 1 << 1  # the PSF-fit stamp leaves the image
    NO_DATA_CENTER = 1 << 2  # an unusable (BAD, SAT, CR, NO_DATA, EDGE) pixel in the central 3x3
    MASKED = 1 << 3  # too much of the PSF-fit stamp is masked
    APCORR_FAILED = 1 << 4  # no aperture correction could be measured (none applied)
    BLENDED = 1 << 5  # fitted simultaneously with overlapping neighbours
    USED_APCORR = 1 << 6  # used to measure this image's aperture correction


class DiaSourceFlag(IntFlag):
    """Bits of the DiaSource ``flags`` column (a detection on a difference image)."""

    PSF_FLUX_FAILED = 1 << 0  # no usable difference flux (masked, off the image, non-finite)
    EDGE = 1 << 1  # the PSF-fit stamp leaves the image or the template's coverage
    NO_DATA_CENTER = 1 << 2  # NO_DATA or BAD pixel in the central 3x3
    SATURATED_CENTER = 1 << 3  # SAT in the science or the template in the central 3x3
    CR_CENTER = 1 << 4  # a cosmic ray (or its repair) in the central 3x3
    INTERPOLATED_CENTER = 1 << 5  # an interpolated pixel in the central 3x3
    NEGATIVE = 1 << 6  # found on the negated difference (the source faded)
    DIPOLE = 1 << 7  # a positive and a negative lobe side by side (also isDipole)
    MASKED = 1 << 8  # too much of the PSF-fit stamp is masked
    TEMPLATE_EDGE = 1 << 9  # within a PSF of where the template has no data
    # Not significant once the subtraction's own error at the static source beneath is
    # counted: |flux| < sqrt((5 err)^2 + (2 residualRatio x its calexp flux)^2).
    STATIC_RESIDUAL = 1 << 10
    BAD_SUBTRACTION = 1 << 11  # on a CCD-visit whose residualRatio fails the quality gate


class DiaForcedSourceFlag(IntFlag):
    """Bits of the DiaForcedSource ``flags`` column (a DIAObject measured on one CCD-visit).

    The per-image ForcedSourceFlag bits are kept too, in ``diffFlags`` and ``scienceFlags``.
    """

    DIFF_FLUX_FAILED = 1 << 0  # no usable psfDiffFlux (masked, off the image, non-finite)
    DIFF_NO_DATA_CENTER = 1 << 1  # unusable difference pixel at the centre (e.g. off the template)
    SCIENCE_FLUX_FAILED = 1 << 2  # no usable psfFlux on the calexp
    SCIENCE_NO_DATA_CENTER = 1 << 3  # unusable calexp pixel at the centre
    NO_DIFFERENCE_IMAGE = 1 << 4  # the CCD-visit has no difference image (recorded skip)
    BLENDED = 1 << 5  # fitted jointly with overlapping DIAObjects


# DIASources that must not seed a DIAObject (the artifact cut).
ARTIFACT_DIA_SOURCE = int(
    DiaSourceFlag.PSF_FLUX_FAILED
    | DiaSourceFlag.EDGE
    | DiaSourceFlag.NO_DATA_CENTER
    | DiaSourceFlag.SATURATED_CENTER
    | DiaSourceFlag.CR_CENTER
    | DiaSourceFlag.TEMPLATE_EDGE
    | DiaSourceFlag.STATIC_RESIDUAL
    | DiaSourceFlag.BAD_SUBTRACTION
)


# Sources whose centroid or flux must not be used for calibration or metrics.
UNRELIABLE_SOURCE = int(
    SourceFlag.CENTROID_FAILED
    | SourceFlag.PSF_FLUX_FAILED
    | SourceFlag.EDGE
    | SourceFlag.SATURATED_CENTER
    | SourceFlag.INTERPOLATED_CENTER
    | SourceFlag.CR_CENTER
    | SourceFlag.BAD_CENTER
)


def describe(flag_type: type[IntFlag], value: int) -> list[str]:
    """Names of the bits set in ``value``."""
    return [member.name for member in flag_type if member.value & int(value) and member.name]
