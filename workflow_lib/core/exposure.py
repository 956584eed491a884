"""The exposure data model: image, mask planes, variance, WCS, PSF, calibration.

Mirrors lsst.afw.image.Exposure closely enough that DESC habits carry over:
named mask planes with LSST's bit order and ``MP_<NAME>`` header cards, a
variance plane, a TAN(-SIP) WCS, a PSF model evaluable anywhere, and a
photometric calibration to nanojansky.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.psf_model import PsfModel


def copy_cards(header: Mapping[str, object], drop: Callable[[str], bool]) -> fits.Header:
    """The cards of ``header`` whose keyword ``drop`` does not reject, with their comments;
    HIERARCH cards stay HIERARCH (setting them by keyword would warn for each)."""
    out = fits.Header()
    if isinstance(header, fits.Header):
        for card in header.cards:
            if not drop(card.keyword):
                out.append(card)
    else:
        for key, value in header.items():
            if not drop(key):
                out.append(fits.Card(f"HIERARCH {key}" if len(key) > 8 else key, value))
    return out


# LSST's default plane order (afw Mask), then the planes the stages add.
DEFAULT_MASK_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "DETECTED",
    "DETECTED_NEGATIVE",
    "SUSPECT",
    "NO_DATA",
    "CROSSTALK",
    "NOT_DEBLENDED",
    "UNMASKEDNAN",
    "CLIPPED",
    "INEXACT_PSF",
    "REJECTED",
    "SENSOR_EDGE",
    "STREAK",
)
MASK_DTYPE = np.dtype(np.int32)
_MAX_PLANES = 31  # int32, sign bit left alone


@dataclass
class MaskPlanes:
    """Mapping of mask-plane names to bit numbers."""

    bits: dict[str, int] = field(
        default_factory=lambda: {n: i for i, n in enumerate(DEFAULT_MASK_PLANES)}
    )

    def bitmask(self, *names: str) -> int:
        """Integer with the bits of ``names`` set; unknown names are an error."""
        value = 0
        for name in names:
            if name not in self.bits:
                raise KeyError(f"unknown mask plane {name!r}; known: {', '.join(self.bits)}")
            value |= 1 << self.bits[name]
        return value

    def add(self, name: str) -> int:
        """Bit of ``name``, adding the plane if it is new."""
        if name not in self.bits:
            free = sorted(set(range(_MAX_PLANES)) - set(self.bits.values()))
            if not free:
                raise ValueError(f"no free mask bit for plane {name!r}")
            self.bits[name] = free[0]
        return self.bits[name]

    def to_cards(self) -> list[tuple[str, int, str]]:
        """``MP_<NAME> = bit`` header cards, as the LSST stack writes them."""
        cards = []
        for name, bit in sorted(self.bits.items(), key=lambda kv: kv[1]):
            key = f"MP_{name}"
            # Names over 8 characters need HIERARCH, as the LSST stack writes them.
            cards.append((key if len(key) <= 8 else f"HIERARCH {key}", bit, f"mask plane {name}"))
        return cards

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> MaskPlanes:
        """Planes from ``MP_*`` cards; falls back to the default planes if none."""
        bits = {key[3:]: int(value) for key, value in header.items() if str(key).startswith("MP_")}
        return cls(bits) if bits else cls()

    def translate(self, mask: np.ndarray, target: MaskPlanes) -> np.ndarray:
        """Re-express ``mask`` (in these planes' bits) in ``target``'s bits."""
        out = np.zeros(mask.shape, dtype=MASK_DTYPE)
        for name, bit in self.bits.items():
            target_bit = target.add(name)
            out |= ((mask >> bit) & 1).astype(MASK_DTYPE) << target_bit
        return out


@dataclass(frozen=True)
class PhotoCalib:
    """Photometric calibration: nJy per image unit, and the zero point.

    ``zero_point`` is the AB magnitude of a source giving one electron per
    second (CONTRACT 2). ``njy_per_unit`` converts image pixel values to nJy;
    for a calexp already in nJy it is 1.
    """

    njy_per_unit: float
    njy_per_unit_err: float = 0.0
    zero_point: float = float("nan")
    zero_point_err: float = float("nan")

    @staticmethod
    def njy_per_electron(zero_point: float, exptime: float) -> float:
        """nJy represented by one electron of a ``exptime``-second exposure."""
        return 10.0 ** (-0.4 * (zero_point - 31.4)) / exptime

    def to_cards(self) -> list[tuple[str, float, str]]:
        return [
            ("PHOTCALB", self.njy_per_unit, "nJy per image unit"),
            ("PHOTCALE", self.njy_per_unit_err, "error of PHOTCALB"),
            ("ZEROPT", self.zero_point, "AB mag giving 1 e-/s"),
            ("ZEROPTE", self.zero_point_err, "error of ZEROPT"),
        ]

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> PhotoCalib | None:
        if "PHOTCALB" not in header:
            return None

        def value(key: str) -> float:
            raw = header.get(key)
            return float(raw) if raw is not None else float("nan")

        return cls(
            njy_per_unit=value("PHOTCALB"),
            njy_per_unit_err=value("PHOTCALE"),
            zero_point=value("ZEROPT"),
            zero_point_err=value("ZEROPTE"),
        )


@dataclass
class Exposure:
    """An image with its mask, variance, WCS, PSF, calibration and metadata.

    Arrays are (ny, nx) in native byte order. ``origin`` is the (x0, y0) of
    pixel [0, 0] in the parent frame (a patch or detector); the WCS refers to
    this array's own 0-based pixels.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: WCS | None = None
    psf: PsfModel | None = None
    photo_calib: PhotoCalib | None = None
    metadata: fits.Header = field(default_factory=fits.Header)
    mask_planes: MaskPlanes = field(default_factory=MaskPlanes)
    origin: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=MASK_DTYPE)
        shapes = {self.image.shape, self.variance.shape, self.mask.shape}
        if len(shapes) != 1 or self.image.ndim != 2:
            raise ValueError(
                f"image {self.image.shape}, variance {self.variance.shape} and mask "
                f"{self.mask.shape} must be equal 2-d shapes"
            )

    @classmethod
    def blank(cls, shape: tuple[int, int], **kwargs: Any) -> Exposure:
        """An exposure of zeros with every pixel flagged NO_DATA."""
        planes = MaskPlanes()
        mask = np.full(shape, planes.bitmask("NO_DATA"), dtype=MASK_DTYPE)
        return cls(np.zeros(shape), np.zeros(shape), mask, mask_planes=planes, **kwargs)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def set_mask(self, plane: str, where: np.ndarray) -> None:
        """OR the bit of ``plane`` into the mask where ``where`` is true."""
        bit = self.mask_planes.add(plane)
        self.mask[where] |= np.int32(1 << bit)

    def mask_of(self, *planes: str) -> np.ndarray:
        """Boolean array: any of ``planes`` set."""
        return (self.mask & self.mask_planes.bitmask(*planes)) != 0

    def planes_present(self) -> Iterable[str]:
        return (
            name for name, bit in self.mask_planes.bits.items() if np.any(self.mask & (1 << bit))
        )
