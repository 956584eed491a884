"""Sky maps: the tracts and patches that coadds are built on.

Two kinds, after LSST's ``lsst.skymap``:

* ``rings`` (``RingsSkyMap``): absolute, whatever the data. The sphere is cut into
  ``num_rings`` rings of declination of height ``pi / (num_rings + 1)`` plus the
  two polar caps (which together make up one more ring height), each cap being
  one tract. Ring ``r`` (south to north) is centred on Dec
  ``(r + 1) * ring_size - 90 deg`` and cut in RA into
  ``int(2 pi cos(dec_edge) / ring_size) + 1`` equal tracts, where ``dec_edge``
  is the ring edge closer to the equator (where the ring is widest, so the
  tracts overlap everywhere). Tract 0 is the south cap, tract 1 the tract at
  ``ra_start`` in the southernmost ring, numbering goes east round each ring
  and then north; the north cap is the last tract.
* ``discrete`` (``DiscreteSkyMap`` as fitted by ``makeDiscreteSkyMap``): one
  tract centred on the data's footprint, its radius the footprint's bounding
  circle plus a border.

Every tract has a zenithal WCS (TAN by default) with CRVAL at its centre, north
up, east left and the configured pixel scale, and an integer pixel bbox starting
at (0, 0): LSST's "explicit" tract bbox (the square that holds a circle of the
tract radius plus the tract overlap), rounded up to a whole number of patches
about its centre. Patches tile the tract with their inner bboxes; a patch's
outer bbox is the inner one grown by the patch border and clipped to the tract.

DC2's sky map, the defaults of :func:`rings_sky_map`: ``rings`` with
``numRings = 120``, ``projection = "TAN"`` and ``tractOverlap = 1/60`` deg (the
DC2 Cookbook's ``makeSkyMapConfig.py``, LSSTDESC/DC2_Repo, whose CFHT example
used ``pixelScale = 0.185``), ``pixelScale = 0.2`` arcsec (LSSTDESC/gen3_workflow
``config/makeSkyMap*.py``) and LSST's default patches of 4000 x 4000 pixels with
a 100-pixel border. lsst/ci_imsim ``configs/skymap.py`` quotes the centre of
DC2 tract 3828, patch (3, 3) (7 x 7 patches); this module reproduces it to
1e-9 deg (``tests/test_skymap.py``).

One deliberate difference from LSST: where LSST's square would not hold the
tract's own ring sector grown by the tract overlap (high |Dec|, where the
sector's pole-side corners bulge out in the projection), the tract bbox grows
by whole patches on that side, so every point of a tract's inner region lies in
its bbox with the overlap to spare. Elsewhere (the whole DC2 area) tracts,
patches and their pixel grids are LSST's.

Numerics only: no files. Coordinates in degrees; pixels 0-based with integer
pixel centres; a bbox is ``(x0, y0, nx, ny)``.

Cost (``benchmarks/bench_skymap.py``): the DC2 rings map builds in ~50 ms
(tract WCS objects are made on first use); to find the patches of many CCDs
call :func:`ccd_patches` (or ``SkyMap.polygon_patches``) once for all of
them, ~10-20 us of CPU per CCD, rather than ``patches_overlapping`` per CCD
(~0.3 ms each, numpy call overhead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from workflow_lib.core.registry import CORNER_DEC_COLUMNS, CORNER_RA_COLUMNS

SKYMAP_KINDS = ("discrete", "rings")
# Zenithal projections (pixel grid about the tract centre); LSST's default is TAN.
PROJECTIONS = ("TAN", "SIN", "STG", "ARC", "ZEA")
FORMAT_VERSION = 1
# Tracts asked of the k-d tree per polygon before falling back to a radius search
# (a CCD-sized polygon meets at most ~4 tracts of DC2's rings).
_NEAREST_TRACTS = 8

Bbox = tuple[int, int, int, int]


# ----------------------------------------------------------------- spherical helpers
def _unit_vectors(ra_deg: Any, dec_deg: Any) -> np.ndarray:
    ra = np.deg2rad(np.asarray(ra_deg, dtype=float))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=float))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def _to_radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    ra = np.rad2deg(np.arctan2(y, x)) % 360.0
    dec = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
    return ra, dec


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (rad) between unit vectors, accurate at small and large angles."""
    a0, a1, a2 = a[..., 0], a[..., 1], a[..., 2]
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    cross = np.sqrt((a1 * b2 - a2 * b1) ** 2 + (a2 * b0 - a0 * b2) ** 2 + (a0 * b1 - a1 * b0) ** 2)
    return np.arctan2(cross, a0 * b0 + a1 * b1 + a2 * b2)


def _next_vertex(n_vertices: int) -> np.ndarray:
    """Index of the following vertex round a polygon (faster than np.roll)."""
    return np.roll(np.arange(n_vertices), -1)


def _frame_axes(ra_deg: Any, dec_deg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors of a tangent point and its local east and north directions.

    At the poles (where east is undefined) the axes are those of the limit at
    the given RA, as FITS zenithal projections with LONPOLE = 180 use.
    """
    ra = np.deg2rad(np.asarray(ra_deg, dtype=float))
    dec = np.deg2rad(np.asarray(dec_deg, dtype=float))
    centre = _unit_vectors(ra_deg, dec_deg)
    east = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)], axis=-1)
    north = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)], axis=-1)
    return centre, east, north


def _radial(rho: np.ndarray, projection: str) -> np.ndarray:
    """Zenithal projection: plane radius (rad) of a point ``rho`` rad from the centre."""
    if projection == "TAN":
        return np.tan(rho)
    if projection == "SIN":
        return np.sin(rho)
    if projection == "STG":
        return 2.0 * np.tan(rho / 2.0)
    if projection == "ARC":
        return np.asarray(rho, dtype=float)
    if projection == "ZEA":
        return 2.0 * np.sin(rho / 2.0)
    raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, not {projection!r}")


def _radial_inverse(r: np.ndarray, projection: str) -> np.ndarray:
    if projection == "TAN":
        return np.arctan(r)
    if projection == "SIN":
        return np.arcsin(np.minimum(r, 1.0))
    if projection == "STG":
        return 2.0 * np.arctan(r / 2.0)
    if projection == "ARC":
        return np.asarray(r, dtype=float)
    if projection == "ZEA":
        return 2.0 * np.arcsin(np.minimum(r / 2.0, 1.0))
    raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, not {projection!r}")


def _project(
    xyz: np.ndarray,
    centre: np.ndarray,
    east: np.ndarray,
    north: np.ndarray,
    projection: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plane coordinates (xi east, eta north; rad) and cos(distance) of points.

    All arrays broadcast over their leading axes; the last axis holds vectors.
    Points at or beyond 90 deg from the centre have no TAN image: callers check
    the returned cosine.
    """
    a = np.sum(xyz * east, axis=-1)
    b = np.sum(xyz * north, axis=-1)
    c = np.sum(xyz * centre, axis=-1)
    if projection == "TAN":
        with np.errstate(divide="ignore", invalid="ignore"):
            return a / c, b / c, c
    sin_rho = np.hypot(a, b)
    rho = np.arctan2(sin_rho, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sin_rho > 0, _radial(rho, projection) / sin_rho, 1.0)
    return a * scale, b * scale, c


def _deproject(
    xi: np.ndarray,
    eta: np.ndarray,
    centre: np.ndarray,
    east: np.ndarray,
    north: np.ndarray,
    projection: str,
) -> np.ndarray:
    """Unit vectors of plane points (inverse of :func:`_project`)."""
    r = np.hypot(xi, eta)
    rho = _radial_inverse(r, projection)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(r > 0, np.sin(rho) / r, 1.0)
    return (
        np.cos(rho)[..., None] * centre + (k * xi)[..., None] * east + (k * eta)[..., None] * north
    )


def _offset_points(xyz: np.ndarray, angle: float, n_directions: int) -> np.ndarray:
    """Points ``angle`` rad from each of ``xyz`` (.., 3) in ``n_directions`` bearings.

    The distance is stretched so that the polygon of offsets circumscribes the
    circle of radius ``angle``.
    """
    stretched = angle / math.cos(math.pi / n_directions)
    ra, dec = _to_radec(xyz)
    _, east, north = _frame_axes(ra, dec)
    bearing = 2.0 * np.pi * np.arange(n_directions) / n_directions
    direction = (
        np.cos(bearing)[:, None] * east[..., None, :]
        + np.sin(bearing)[:, None] * north[..., None, :]
    )
    return math.cos(stretched) * xyz[..., None, :] + math.sin(stretched) * direction


# ---------------------------------------------------------------------- tract layout
@dataclass(frozen=True)
class _TractBox:
    """Pixel layout of a tract about its centre (pixel (0, 0) before the final shift)."""

    x0: int
    y0: int
    nx: int
    ny: int

    def n_patches(self, patch_inner_size: int) -> tuple[int, int]:
        return self.nx // patch_inner_size, self.ny // patch_inner_size


def _tract_box(
    half_size_px: float,
    patch_inner_size: int,
    required: tuple[float, float, float, float] | None = None,
) -> _TractBox:
    """LSST's explicit-tract bbox, optionally grown to hold ``required``.

    The square ``[-half, half]^2`` (continuous pixel coordinates about the
    centre) becomes the integer bbox of the pixels it touches, is padded
    symmetrically to a whole number of patches, and then, if the continuous box
    ``required = (xmin, ymin, xmax, ymax)`` sticks out, is extended by whole
    patches on that side (so existing patch boundaries stay where they are).
    """
    start = math.floor(-half_size_px + 0.5)
    stop = math.ceil(half_size_px - 0.5)  # last pixel, inclusive
    dim = stop + 1 - start
    n = -(-dim // patch_inner_size)
    start -= (patch_inner_size * n - dim) // 2
    dim = patch_inner_size * n
    x0 = y0 = start
    nx = ny = dim
    if required is not None:
        xmin, ymin, xmax, ymax = required

        def patches_short(beyond: float) -> int:
            return max(math.ceil(beyond / patch_inner_size), 0)

        grow = patches_short((x0 - 0.5) - xmin) * patch_inner_size
        x0, nx = x0 - grow, nx + grow
        nx += patches_short(xmax - (x0 + nx - 0.5)) * patch_inner_size
        grow = patches_short((y0 - 0.5) - ymin) * patch_inner_size
        y0, ny = y0 - grow, ny + grow
        ny += patches_short(ymax - (y0 + ny - 0.5)) * patch_inner_size
    return _TractBox(x0=x0, y0=y0, nx=nx, ny=ny)


@dataclass(frozen=True)
class _Rings:
    """The ring geometry of LSST's RingsSkyMap (version 1 tract numbering)."""

    num_rings: int
    ra_start_deg: float

    @cached_property
    def ring_size(self) -> float:
        """Height of a ring in Dec (rad); the two caps together count as one ring."""
        return math.pi / (self.num_rings + 1)

    @cached_property
    def counts(self) -> np.ndarray:
        """Number of tracts of each ring, south to north."""
        size = self.ring_size
        counts = []
        for ring in range(self.num_rings):
            start = size * (ring + 0.5) - 0.5 * math.pi
            stop = start + size
            # The edge nearer the equator, where the ring is widest (as LSST).
            dec = min(abs(start), abs(stop))
            counts.append(int(2.0 * math.pi * math.cos(dec) / size) + 1)
        return np.array(counts, dtype=np.int64)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Tract id of the first tract of each ring, less one (the south cap)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @property
    def n_tracts(self) -> int:
        return int(self.counts.sum()) + 2

    def ring_centre_dec(self, ring: np.ndarray) -> np.ndarray:
        """Dec (deg) of the centre of ring ``ring`` (-1: south cap, num_rings: north cap)."""
        ring = np.asarray(ring)
        dec = np.rad2deg(self.ring_size * (ring + 1) - 0.5 * math.pi)
        return np.where(ring < 0, -90.0, np.where(ring >= self.num_rings, 90.0, dec))

    def tract_centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ra, dec, ring) of every tract, by tract id."""
        ring = np.repeat(np.arange(self.num_rings), self.counts)
        within = np.arange(len(ring)) - self.offsets[ring]
        step = 2.0 * math.pi / self.counts[ring]
        ra = np.rad2deg((within * step + math.radians(self.ra_start_deg)) % (2.0 * math.pi))
        ring = np.concatenate([[-1], ring, [self.num_rings]])
        ra = np.concatenate([[0.0], ra, [0.0]])
        return ra, self.ring_centre_dec(ring), ring

    def find(self, ra_deg: Any, dec_deg: Any) -> np.ndarray:
        """The tract whose ring sector holds each point (-1 for non-finite input)."""
        ra = np.deg2rad(np.atleast_1d(np.asarray(ra_deg, dtype=float)))
        dec = np.deg2rad(np.atleast_1d(np.asarray(dec_deg, dtype=float)))
        ra, dec = np.broadcast_arrays(ra, dec)
        first_ring_start = 0.5 * self.ring_size - 0.5 * math.pi
        good = np.isfinite(ra) & np.isfinite(dec)
        ring = np.floor((np.where(good, dec, 0.0) - first_ring_start) / self.ring_size)
        ring = np.clip(ring, 0, self.num_rings - 1).astype(np.int64)
        n = self.counts[ring]
        turn = (np.where(good, ra, 0.0) - math.radians(self.ra_start_deg)) % (2.0 * math.pi)
        within = (turn / (2.0 * math.pi / n) + 0.5).astype(np.int64)
        within[within >= n] = 0  # wrap round past ra_start
        ids = 1 + self.offsets[ring] + within
        ids[dec < first_ring_start] = 0
        ids[dec > -first_ring_start] = self.n_tracts - 1
        ids[~good] = -1
        return ids

    def sector_box(self, ring: int, projection: str, overlap_rad: float) -> np.ndarray:
        """Continuous bbox (xmin, ymin, xmax, ymax; plane rad) of a tract's ring sector.

        The sector of a tract of ring ``ring`` (centred at RA 0: the layout does
        not depend on RA) grown by ``overlap_rad``, in the plane of its
        projection (x = east, as xi).
        """
        size = self.ring_size
        dec_c = size * (ring + 1) - 0.5 * math.pi
        half_ra = math.pi / self.counts[ring]
        t = np.linspace(-1.0, 1.0, 33)
        edge_dec = np.concatenate(
            [
                np.full(33, dec_c - size / 2),
                np.full(33, dec_c + size / 2),
                dec_c + t * size / 2,
                dec_c + t * size / 2,
            ]
        )
        edge_ra = np.concatenate(
            [t * half_ra, t * half_ra, np.full(33, -half_ra), np.full(33, half_ra)]
        )
        points = _unit_vectors(np.rad2deg(edge_ra), np.rad2deg(edge_dec))
        if overlap_rad > 0:
            points = _offset_points(points, overlap_rad, 16).reshape(-1, 3)
        centre, east, north = _frame_axes(0.0, math.degrees(dec_c))
        xi, eta, _ = _project(points, centre, east, north, projection)
        return np.array([xi.min(), eta.min(), xi.max(), eta.max()])


# ------------------------------------------------------------------ public dataclasses
@dataclass(frozen=True)
class _WcsFrame:
    """What a tract or patch WCS is made of (crpix 0-based)."""

    ra: float
    dec: float
    crpix: tuple[float, float]
    pixel_scale_deg: float
    projection: str
    shape: tuple[int, int]  # (ny, nx)

    def make_wcs(self) -> WCS:
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = [f"RA---{self.projection}", f"DEC--{self.projection}"]
        wcs.wcs.cunit = ["deg", "deg"]
        wcs.wcs.crval = [self.ra, self.dec]
        wcs.wcs.crpix = [self.crpix[0] + 1.0, self.crpix[1] + 1.0]
        wcs.wcs.cd = [[-self.pixel_scale_deg, 0.0], [0.0, self.pixel_scale_deg]]
        # Explicit, so that a tract at a pole keeps the orientation of the limit
        # (the FITS default would flip it there).
        wcs.wcs.lonpole = 180.0
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.set()
        wcs.array_shape = self.shape
        return wcs


@dataclass(frozen=True)
class PatchInfo:
    """One patch of a tract: its inner and outer pixel bboxes and the outer bbox's WCS."""

    tract: int
    patch: int  # sequential index = iy * n_patches_x + ix
    index: tuple[int, int]  # (ix, iy)
    inner_bbox: Bbox  # (x0, y0, nx, ny) in tract pixels
    outer_bbox: Bbox  # inner grown by the border, clipped to the tract
    _frame: _WcsFrame = field(repr=False, compare=False)

    @cached_property
    def wcs(self) -> WCS:
        """WCS of the outer bbox's own 0-based pixels (the tract WCS, shifted)."""
        return self._frame.make_wcs()

    def in_inner_region(self, ra: Any, dec: Any) -> np.ndarray:
        """Whether each point (deg) falls in this patch's inner bbox (not its border)."""
        x, y = self.wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0, quiet=True)
        ox, oy = self.outer_bbox[0], self.outer_bbox[1]
        x0, y0, nx, ny = self.inner_bbox
        inside = (x + ox >= x0 - 0.5) & (x + ox < x0 + nx - 0.5)
        return np.asarray(inside & (y + oy >= y0 - 0.5) & (y + oy < y0 + ny - 0.5), dtype=bool)


@dataclass(frozen=True)
class TractInfo:
    """One tract: centre, pixel frame (WCS and shape) and patch grid."""

    tract: int
    ra: float  # centre, deg
    dec: float
    wcs: WCS = field(repr=False, compare=False)
    shape: tuple[int, int]  # (ny, nx)
    n_patches: tuple[int, int]  # (nx, ny)
    skymap: SkyMap = field(repr=False, compare=False)

    @property
    def bbox(self) -> Bbox:
        return (0, 0, self.shape[1], self.shape[0])

    def patch(self, patch: int) -> PatchInfo:
        """The patch with sequential index ``patch``."""
        nx, ny = self.n_patches
        if not 0 <= int(patch) < nx * ny:
            raise IndexError(f"tract {self.tract} has patches 0..{nx * ny - 1}, not {patch}")
        ix, iy = int(patch) % nx, int(patch) // nx
        size = self.skymap.patch_inner_size
        border = self.skymap.patch_border
        inner = (ix * size, iy * size, size, size)
        x0, y0 = max(inner[0] - border, 0), max(inner[1] - border, 0)
        x1 = min(inner[0] + size + border, self.shape[1])
        y1 = min(inner[1] + size + border, self.shape[0])
        outer = (x0, y0, x1 - x0, y1 - y0)
        crpix = self.skymap._frames.crpix[self.skymap._row(self.tract)]
        frame = _WcsFrame(
            ra=self.ra,
            dec=self.dec,
            crpix=(float(crpix[0]) - x0, float(crpix[1]) - y0),
            pixel_scale_deg=self.skymap.pixel_scale_deg,
            projection=self.skymap.projection,
            shape=(y1 - y0, x1 - x0),
        )
        return PatchInfo(
            tract=self.tract,
            patch=int(patch),
            index=(ix, iy),
            inner_bbox=inner,
            outer_bbox=outer,
            _frame=frame,
        )

    def patch_at(self, index: tuple[int, int]) -> PatchInfo:
        """The patch with index ``(ix, iy)``."""
        ix, iy = index
        nx, ny = self.n_patches
        if not (0 <= ix < nx and 0 <= iy < ny):
            raise IndexError(f"tract {self.tract} has {nx} x {ny} patches, not index {index}")
        return self.patch(iy * nx + ix)

    def patches_overlapping(self, ra: Any, dec: Any) -> list[PatchInfo]:
        """Patches whose outer bbox overlaps the convex sky polygon (vertices in deg)."""
        _, _, patch = self.skymap.polygon_patches(
            np.asarray(ra, dtype=float)[None, :],
            np.asarray(dec, dtype=float)[None, :],
            tracts=[self.tract],
        )
        return [self.patch(int(p)) for p in patch]

    def sky_to_pixel(self, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        """0-based tract pixel positions of sky positions (NaN where TAN has no image)."""
        return self.skymap._sky_to_pixel(self.tract, ra, dec)

    def in_inner_region(self, ra: Any, dec: Any) -> np.ndarray:
        """Whether each point is in this tract's own region (``find_tracts`` gives it)."""
        return self.skymap.find_tracts(ra, dec) == self.tract

    def contains(self, ra: Any, dec: Any) -> np.ndarray:
        """Whether each point falls in this tract's pixel bbox."""
        x, y = self.sky_to_pixel(ra, dec)
        ny, nx = self.shape
        return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


# ------------------------------------------------------------------------- sky map
@dataclass(frozen=True)
class _Frames:
    """Every tract's frame as arrays (one row per tract, ordered by tract id)."""

    ids: np.ndarray  # (T,) int64, sorted
    ra: np.ndarray  # (T,) deg
    dec: np.ndarray
    crpix: np.ndarray  # (T, 2) 0-based pixel of the centre
    size: np.ndarray  # (T, 2) nx, ny
    n_patches: np.ndarray  # (T, 2)
    reach: np.ndarray  # (T,) rad: farthest bbox corner from the centre

    @cached_property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _frame_axes(self.ra, self.dec)


class SkyMap:
    """A set of tracts and their patches (see the module docstring).

    Build one with :func:`rings_sky_map` or :func:`discrete_sky_map`; tracts are
    made on demand (``tract``); many-polygon queries are vectorised
    (``polygon_patches``, :func:`ccd_patches`).
    """

    def __init__(
        self,
        kind: str,
        params: Mapping[str, Any],
        frames: _Frames,
        rings: _Rings | None = None,
    ) -> None:
        self.kind = kind
        self._params = dict(params)
        self._frames = frames
        self._rings = rings
        self._tracts: dict[int, TractInfo] = {}
        self.pixel_scale_arcsec = float(params["pixel_scale_arcsec"])
        self.pixel_scale_deg = self.pixel_scale_arcsec / 3600.0
        self.patch_inner_size = int(params["patch_inner_size"])
        self.patch_border = int(params["patch_border"])
        self.projection = str(params["projection"])

    # -- identity ----------------------------------------------------------------
    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"SkyMap({self.kind!r}, {len(self)} tracts, {settings})"

    def __len__(self) -> int:
        return len(self._frames.ids)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkyMap) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.to_dict().items())))

    @property
    def tract_ids(self) -> np.ndarray:
        return self._frames.ids.copy()

    def tract_centres(self) -> pd.DataFrame:
        """Every tract's id, centre (ra, dec; deg) and patch grid (n_patches_x, n_patches_y)."""
        f = self._frames
        return pd.DataFrame(
            {
                "tract": f.ids,
                "ra": f.ra,
                "dec": f.dec,
                "n_patches_x": f.n_patches[:, 0],
                "n_patches_y": f.n_patches[:, 1],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; ``SkyMap.from_dict`` rebuilds the same sky map."""
        return {"format_version": FORMAT_VERSION, "kind": self.kind, **self._params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SkyMap:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"sky map format_version {version!r} is not {FORMAT_VERSION}")
        kind = data.pop("kind", None)
        if kind == "rings":
            return rings_sky_map(**data)
        if kind == "discrete":
            return _discrete_from_circle(**data)
        raise ValueError(f"sky map kind must be one of {', '.join(SKYMAP_KINDS)}, not {kind!r}")

    # -- tracts ------------------------------------------------------------------
    def _row(self, tract: int) -> int:
        row = int(np.searchsorted(self._frames.ids, tract))
        if row >= len(self._frames.ids) or self._frames.ids[row] != tract:
            raise KeyError(f"tract {tract} is not in this {self.kind} sky map")
        return row

    def tract(self, tract: int) -> TractInfo:
        """The tract with id ``tract`` (KeyError if there is none)."""
        tract = int(tract)
        info = self._tracts.get(tract)
        if info is None:
            row = self._row(tract)
            f = self._frames
            nx, ny = (int(v) for v in f.size[row])
            frame = _WcsFrame(
                ra=float(f.ra[row]),
                dec=float(f.dec[row]),
                crpix=(float(f.crpix[row, 0]), float(f.crpix[row, 1])),
                pixel_scale_deg=self.pixel_scale_deg,
                projection=self.projection,
                shape=(ny, nx),
            )
            info = TractInfo(
                tract=tract,
                ra=frame.ra,
                dec=frame.dec,
                wcs=frame.make_wcs(),
                shape=(ny, nx),
                n_patches=(int(f.n_patches[row, 0]), int(f.n_patches[row, 1])),
                skymap=self,
            )
            self._tracts[tract] = info
        return info

    def patch(self, tract: int, patch: int) -> PatchInfo:
        return self.tract(tract).patch(patch)

    def find_tracts(self, ra: Any, dec: Any) -> np.ndarray:
        """The tract whose inner region holds each point (-1 where none does).

        Rings: the tract whose ring sector holds it (every point has exactly
        one). Discrete: the tract whose pixel bbox holds it.
        """
        if self._rings is not None:
            return self._rings.find(ra, dec)
        ra, dec = np.broadcast_arrays(
            np.atleast_1d(np.asarray(ra, dtype=float)), np.atleast_1d(np.asarray(dec, dtype=float))
        )
        out = np.full(ra.shape, -1, dtype=np.int64)
        for tract in self._frames.ids[::-1]:  # the lowest id wins where tracts overlap
            out[self.tract(int(tract)).contains(ra, dec)] = tract
        return out

    def _sky_to_pixel(self, tract: int, ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
        row = self._row(tract)
        xyz = _unit_vectors(ra, dec)
        centre, east, north = (axis[row] for axis in self._frames.axes)
        xi, eta, cos_rho = _project(xyz, centre, east, north, self.projection)
        scale = np.deg2rad(self.pixel_scale_deg)
        x = self._frames.crpix[row, 0] - xi / scale
        y = self._frames.crpix[row, 1] + eta / scale
        behind = ~(cos_rho > 0) if self.projection == "TAN" else ~np.isfinite(cos_rho)
        return np.where(behind, np.nan, x), np.where(behind, np.nan, y)

    # -- overlaps ----------------------------------------------------------------
    def patches_overlapping(self, ra: Any, dec: Any) -> list[PatchInfo]:
        """Patches (of any tract) whose outer bbox overlaps the convex sky polygon."""
        _, tract, patch = self.polygon_patches(
            np.asarray(ra, dtype=float)[None, :], np.asarray(dec, dtype=float)[None, :]
        )
        return [self.patch(int(t), int(p)) for t, p in zip(tract, patch, strict=True)]

    def tracts_overlapping(self, ra: Any, dec: Any) -> list[TractInfo]:
        """Tracts whose bbox overlaps the convex sky polygon (vertices in deg)."""
        _, tract, _ = self.polygon_patches(
            np.asarray(ra, dtype=float)[None, :], np.asarray(dec, dtype=float)[None, :]
        )
        return [self.tract(int(t)) for t in np.unique(tract)]

    @cached_property
    def _tree(self) -> Any:
        from scipy.spatial import cKDTree

        return cKDTree(self._frames.axes[0])

    def polygon_patches(
        self,
        ra: np.ndarray,
        dec: np.ndarray,
        *,
        margin_arcsec: float = 0.0,
        tracts: Any = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (polygon, tract, patch) whose patch outer bbox overlaps the polygon.

        ``ra``, ``dec``: (N, K) vertices (deg) of N small convex sky polygons
        (CCD-sized: radius under 10 deg), in order round each polygon, either
        sense. ``margin_arcsec`` grows every polygon by that much first.
        ``tracts`` restricts the search to those tract ids. Returns three int64
        arrays sorted by polygon, tract, patch.

        The overlap test is exact for TAN tracts (polygon edges are great
        circles, straight in the tract plane): the polygon's projected bbox
        picks candidate patches, and a separating-axis test along the polygon's
        edge normals drops those it only touches with its bbox.
        """
        ra = np.asarray(ra, dtype=float)
        dec = np.asarray(dec, dtype=float)
        if ra.ndim != 2 or ra.shape != dec.shape or ra.shape[1] < 3:
            raise ValueError(f"ra and dec must be (N, K >= 3) vertex arrays, not {ra.shape}")
        if not (np.isfinite(ra).all() and np.isfinite(dec).all()):
            raise ValueError("polygon vertices must be finite")
        empty = np.zeros(0, dtype=np.int64)
        if ra.shape[0] == 0:
            return empty, empty.copy(), empty.copy()
        xyz = _unit_vectors(ra, dec)
        if margin_arcsec < 0:
            raise ValueError(f"margin_arcsec must be >= 0, not {margin_arcsec}")
        if margin_arcsec > 0:
            xyz = _grow_polygons(xyz, math.radians(margin_arcsec / 3600.0))
        centre = _normalize(xyz.sum(axis=1))
        radius = _angle_between(centre[:, None, :], xyz).max(axis=1)
        if radius.max() > math.radians(10.0):
            raise ValueError("polygons must be CCD-sized (under ~10 deg in radius)")
        poly, row = self._candidate_pairs(centre, radius, tracts)
        return self._pair_patches(xyz, poly, row)

    def _candidate_pairs(
        self, centre: np.ndarray, radius: np.ndarray, tracts: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """(polygon, tract row) pairs whose bounding circles meet."""
        f = self._frames
        if tracts is not None:
            rows = np.array([self._row(int(t)) for t in np.atleast_1d(tracts)], dtype=np.int64)
            poly = np.repeat(np.arange(len(centre)), len(rows))
            row = np.tile(rows, len(centre))
        elif len(f.ids) <= 64:
            poly = np.repeat(np.arange(len(centre)), len(f.ids))
            row = np.tile(np.arange(len(f.ids)), len(centre))
        else:
            search = np.minimum(f.reach.max() + radius, math.pi)
            chord = 2.0 * np.sin(search / 2.0) + 1e-12
            # The k nearest tracts as arrays; the few polygons that may have more
            # within reach are asked again for all of them.
            k = min(_NEAREST_TRACTS, len(f.ids))
            distance, nearest = self._tree.query(centre, k=[*range(1, k + 1)])
            within = distance <= chord[:, None]
            crowded = np.flatnonzero(within[:, -1]) if k < len(f.ids) else np.zeros(0, int)
            within[crowded] = False
            poly = np.nonzero(within)[0]
            row = nearest[within].astype(np.int64)
            if len(crowded):
                hits = self._tree.query_ball_point(centre[crowded], chord[crowded])
                counts = np.array([len(h) for h in hits], dtype=np.int64)
                poly = np.concatenate([poly, np.repeat(crowded, counts)])
                row = np.concatenate([row, np.concatenate(hits).astype(np.int64)])
        axes_centre = f.axes[0][row]
        near = _angle_between(centre[poly], axes_centre) <= f.reach[row] + radius[poly] + 1e-9
        return poly[near], row[near]

    def _pair_patches(
        self, xyz: np.ndarray, poly: np.ndarray, row: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = self._frames
        centre, east, north = (axis[row][:, None, :] for axis in f.axes)
        xi, eta, cos_rho = _project(xyz[poly], centre, east, north, self.projection)
        if (cos_rho <= 1e-6).any():
            raise ValueError("a polygon reaches 90 deg from a tract centre")
        scale = math.radians(self.pixel_scale_deg)
        x = f.crpix[row, 0][:, None] - xi / scale
        y = f.crpix[row, 1][:, None] + eta / scale
        xa, xb, ya, yb = x.min(axis=1), x.max(axis=1), y.min(axis=1), y.max(axis=1)
        nx, ny = f.size[row, 0], f.size[row, 1]
        size, border = self.patch_inner_size, self.patch_border
        ix0 = np.maximum(np.floor((xa + 0.5 - border) / size), 0).astype(np.int64)
        iy0 = np.maximum(np.floor((ya + 0.5 - border) / size), 0).astype(np.int64)
        ix1 = np.minimum(np.ceil((xb + 0.5 + border) / size) - 1, f.n_patches[row, 0] - 1)
        iy1 = np.minimum(np.ceil((yb + 0.5 + border) / size) - 1, f.n_patches[row, 1] - 1)
        ix1, iy1 = ix1.astype(np.int64), iy1.astype(np.int64)
        inside = (xb > -0.5) & (xa < nx - 0.5) & (yb > -0.5) & (ya < ny - 0.5)
        wx = np.where(inside, np.maximum(ix1 - ix0 + 1, 0), 0)
        wy = np.where(inside, np.maximum(iy1 - iy0 + 1, 0), 0)
        count = wx * wy
        pair = np.repeat(np.arange(len(row)), count)
        k = np.arange(len(pair)) - np.repeat(np.cumsum(count) - count, count)
        ix = ix0[pair] + k % wx[pair]  # wx > 0 wherever a pair has candidates
        iy = iy0[pair] + k // wx[pair]
        # Outer bbox of each candidate patch, continuous pixel edges, clipped to the tract.
        x_lo = np.maximum(ix * size - border, 0) - 0.5
        x_hi = np.minimum((ix + 1) * size + border, nx[pair]) - 0.5
        y_lo = np.maximum(iy * size - border, 0) - 0.5
        y_hi = np.minimum((iy + 1) * size + border, ny[pair]) - 0.5
        keep = _polygon_meets_boxes(x[pair], y[pair], x_lo, x_hi, y_lo, y_hi)
        pair, ix, iy = pair[keep], ix[keep], iy[keep]
        out_poly = poly[pair]
        out_tract = f.ids[row[pair]]
        out_patch = iy * f.n_patches[row[pair], 0] + ix
        order = np.lexsort((out_patch, out_tract, out_poly))
        return (
            out_poly[order].astype(np.int64),
            out_tract[order].astype(np.int64),
            out_patch[order].astype(np.int64),
        )


def _polygon_meets_boxes(
    x: np.ndarray,
    y: np.ndarray,
    x_lo: np.ndarray,
    x_hi: np.ndarray,
    y_lo: np.ndarray,
    y_hi: np.ndarray,
) -> np.ndarray:
    """Whether each convex polygon (rows of x, y) meets its axis-aligned box.

    Separating-axis test: the bboxes already overlap, so only the polygon's
    edge normals can separate them. Degenerate polygons (no area) are kept.
    """
    if len(x) == 0:
        return np.zeros(0, dtype=bool)
    following = _next_vertex(x.shape[1])
    x_next, y_next = x[:, following], y[:, following]
    ex, ey = x_next - x, y_next - y
    area = np.sum(x * y_next - x_next * y, axis=1)
    sense = np.sign(area)[:, None]
    # Outward normals of a counter-clockwise polygon are (ey, -ex).
    nx, ny = sense * ey, -sense * ex
    nearest = np.where(nx > 0, nx * x_lo[:, None], nx * x_hi[:, None]) + np.where(
        ny > 0, ny * y_lo[:, None], ny * y_hi[:, None]
    )
    edge = nx * x + ny * y
    separated = (nearest > edge).any(axis=1)
    overlap = (x.max(axis=1) >= x_lo) & (x.min(axis=1) <= x_hi)
    overlap &= (y.max(axis=1) >= y_lo) & (y.min(axis=1) <= y_hi)
    return overlap & ~separated


def _grow_polygons(xyz: np.ndarray, margin_rad: float) -> np.ndarray:
    """Convex sky polygons (N, K, 3) with every edge moved out by ``margin_rad``.

    Done in each polygon's own gnomonic plane, where its edges are straight:
    each vertex moves along the bisector of its two edges' outward normals by
    the mitre length, so the new edges are parallel to the old ones at the
    margin's distance (the plane stretch of a CCD-sized polygon is allowed for).
    """
    centre = _normalize(xyz.sum(axis=1))
    helper = np.where(
        (np.abs(centre[:, 2]) < 0.9)[:, None], np.array([0.0, 0.0, 1.0]), np.array([1.0, 0, 0])
    )
    e1 = _normalize(np.cross(helper, centre))
    e2 = np.cross(centre, e1)
    c = np.einsum("nkj,nj->nk", xyz, centre)
    u = np.einsum("nkj,nj->nk", xyz, e1) / c
    v = np.einsum("nkj,nj->nk", xyz, e2) / c
    following = _next_vertex(u.shape[1])
    u_next, v_next = u[:, following], v[:, following]
    du, dv = u_next - u, v_next - v
    length = np.hypot(du, dv)
    area = np.sum(u * v_next - u_next * v, axis=1)
    sense = np.where(area >= 0, 1.0, -1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = np.where(length > 0, sense * dv / length, 0.0)
        nv = np.where(length > 0, -sense * du / length, 0.0)
    # Vertex k joins edge k-1 (ending there) and edge k (starting there).
    previous = np.argsort(following)
    pu, pv = nu[:, previous], nv[:, previous]
    mitre = 1.0 + nu * pu + nv * pv
    mitre = np.where(mitre > 1e-3, mitre, 1e-3)
    stretch = 1.0 / np.min(c, axis=1, keepdims=True) ** 2
    step = math.tan(margin_rad) * stretch / mitre
    u2 = u + step * (nu + pu)
    v2 = v + step * (nv + pv)
    grown = centre[:, None, :] + u2[..., None] * e1[:, None, :] + v2[..., None] * e2[:, None, :]
    return _normalize(grown)


# --------------------------------------------------------------------- constructors
def _check_common(
    pixel_scale_arcsec: float, patch_inner_size: int, patch_border: int, projection: str
) -> None:
    if not (math.isfinite(pixel_scale_arcsec) and pixel_scale_arcsec > 0):
        raise ValueError(f"pixel_scale_arcsec must be positive, not {pixel_scale_arcsec}")
    if int(patch_inner_size) != patch_inner_size or patch_inner_size < 1:
        raise ValueError(f"patch_inner_size must be a positive integer, not {patch_inner_size}")
    if int(patch_border) != patch_border or patch_border < 0:
        raise ValueError(f"patch_border must be a non-negative integer, not {patch_border}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, not {projection!r}")


def _reach(box: _TractBox, pixel_scale_deg: float, projection: str) -> float:
    """Angle (rad) from the tract centre to its farthest bbox corner."""
    scale = math.radians(pixel_scale_deg)
    xs = np.array([box.x0 - 0.5, box.x0 + box.nx - 0.5])
    ys = np.array([box.y0 - 0.5, box.y0 + box.ny - 0.5])
    r = np.hypot(np.abs(xs).max(), np.abs(ys).max()) * scale
    return float(_radial_inverse(np.array(r), projection))


def _frames_from_boxes(
    ids: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    boxes: list[_TractBox],
    box_of_tract: np.ndarray,
    pixel_scale_deg: float,
    patch_inner_size: int,
    projection: str,
) -> _Frames:
    x0 = np.array([b.x0 for b in boxes], dtype=float)[box_of_tract]
    y0 = np.array([b.y0 for b in boxes], dtype=float)[box_of_tract]
    size = np.array([(b.nx, b.ny) for b in boxes], dtype=np.int64)[box_of_tract]
    reach = np.array([_reach(b, pixel_scale_deg, projection) for b in boxes])[box_of_tract]
    return _Frames(
        ids=np.asarray(ids, dtype=np.int64),
        ra=np.asarray(ra, dtype=float),
        dec=np.asarray(dec, dtype=float),
        crpix=np.stack([-x0, -y0], axis=1),
        size=size,
        n_patches=size // patch_inner_size,
        reach=reach,
    )


def rings_sky_map(
    *,
    num_rings: int = 120,
    tract_overlap_deg: float = 1.0 / 60.0,
    pixel_scale_arcsec: float = 0.2,
    patch_inner_size: int = 4000,
    patch_border: int = 100,
    projection: str = "TAN",
    ra_start_deg: float = 0.0,
) -> SkyMap:
    """LSST's RingsSkyMap: an absolute tiling of the whole sky (DC2's defaults)."""
    return _rings_sky_map(
        int(num_rings),
        float(tract_overlap_deg),
        float(pixel_scale_arcsec),
        int(patch_inner_size),
        int(patch_border),
        str(projection),
        float(ra_start_deg),
    )


@lru_cache(maxsize=8)
def _rings_sky_map(
    num_rings: int,
    tract_overlap_deg: float,
    pixel_scale_arcsec: float,
    patch_inner_size: int,
    patch_border: int,
    projection: str,
    ra_start_deg: float,
) -> SkyMap:
    _check_common(pixel_scale_arcsec, patch_inner_size, patch_border, projection)
    if num_rings < 1:
        raise ValueError(f"num_rings must be at least 1, not {num_rings}")
    if not (math.isfinite(tract_overlap_deg) and tract_overlap_deg >= 0):
        raise ValueError(f"tract_overlap_deg must be >= 0, not {tract_overlap_deg}")
    if not 0.0 <= ra_start_deg < 360.0:
        raise ValueError(f"ra_start_deg must be in [0, 360), not {ra_start_deg}")
    rings = _Rings(num_rings=num_rings, ra_start_deg=ra_start_deg)
    scale = math.radians(pixel_scale_arcsec / 3600.0)
    overlap = math.radians(tract_overlap_deg)
    # LSST: a square holding the circle of half a ring height plus the overlap.
    half_px = float(_radial(np.array(0.5 * rings.ring_size + overlap), projection)) / scale
    boxes = [_tract_box(half_px, patch_inner_size)]  # the polar caps
    for ring in range(num_rings):
        xi_min, eta_min, xi_max, eta_max = rings.sector_box(ring, projection, overlap)
        # Pixel x runs west (CD1_1 < 0): x = -xi / scale about the centre.
        required = (-xi_max / scale, eta_min / scale, -xi_min / scale, eta_max / scale)
        boxes.append(_tract_box(half_px, patch_inner_size, required))
    ra, dec, ring_of_tract = rings.tract_centres()
    cap = (ring_of_tract < 0) | (ring_of_tract >= num_rings)
    box_of_tract = np.where(cap, 0, ring_of_tract + 1)
    frames = _frames_from_boxes(
        np.arange(rings.n_tracts),
        ra,
        dec,
        boxes,
        box_of_tract,
        pixel_scale_arcsec / 3600.0,
        patch_inner_size,
        projection,
    )
    params = {
        "num_rings": num_rings,
        "tract_overlap_deg": tract_overlap_deg,
        "ra_start_deg": ra_start_deg,
        "pixel_scale_arcsec": pixel_scale_arcsec,
        "patch_inner_size": patch_inner_size,
        "patch_border": patch_border,
        "projection": projection,
    }
    return SkyMap("rings", params, frames, rings)


def footprint_circle(corner_ra: Any, corner_dec: Any) -> tuple[float, float, float]:
    """Centre (ra, dec) and radius (deg) of a circle holding every finite point.

    The centre is the middle of the points' extent in the gnomonic plane about
    their mean direction (indifferent to RA wrap and poles); the radius is the
    largest distance from it.
    """
    ra = np.asarray(corner_ra, dtype=float).ravel()
    dec = np.asarray(corner_dec, dtype=float).ravel()
    good = np.isfinite(ra) & np.isfinite(dec)
    if not good.any():
        raise ValueError("no finite footprint corner to fit a sky map to")
    xyz = _unit_vectors(ra[good], dec[good])
    mean = xyz.sum(axis=0)
    if np.linalg.norm(mean) < 1e-9:
        raise ValueError("the footprint surrounds its own centre: too large for one tract")
    mean_ra, mean_dec = _to_radec(_normalize(mean))
    axes = _frame_axes(mean_ra, mean_dec)
    xi, eta, cos_rho = _project(xyz, *axes, "TAN")
    if (cos_rho < 0.1).any():
        raise ValueError("the footprint spans more than ~80 deg: too large for one tract")
    mid = _deproject(
        np.array((xi.min() + xi.max()) / 2), np.array((eta.min() + eta.max()) / 2), *axes, "TAN"
    )
    mid = _normalize(mid)
    radius = float(np.rad2deg(_angle_between(mid[None, :], xyz).max()))
    centre_ra, centre_dec = _to_radec(mid)
    return float(centre_ra), float(centre_dec), radius


def discrete_sky_map(
    corner_ra: Any,
    corner_dec: Any,
    *,
    pixel_scale_arcsec: float = 0.2,
    patch_inner_size: int = 4000,
    patch_border: int = 100,
    border_deg: float = 0.0,
    projection: str = "TAN",
    tract_id: int = 0,
    tract_overlap_deg: float = 0.0,
) -> SkyMap:
    """One tract fitted to the data: LSST's DiscreteSkyMap as ``makeDiscreteSkyMap`` makes it.

    The tract is centred on the bounding circle of ``corner_ra``/``corner_dec``
    (any shape; NaN ignored), with radius the circle's plus ``border_deg``.
    """
    if not (math.isfinite(border_deg) and border_deg >= 0):
        raise ValueError(f"border_deg must be >= 0, not {border_deg}")
    ra, dec, radius = footprint_circle(corner_ra, corner_dec)
    return _discrete_from_circle(
        ra_deg=ra,
        dec_deg=dec,
        radius_deg=radius + float(border_deg),
        tract_id=int(tract_id),
        tract_overlap_deg=float(tract_overlap_deg),
        pixel_scale_arcsec=float(pixel_scale_arcsec),
        patch_inner_size=int(patch_inner_size),
        patch_border=int(patch_border),
        projection=str(projection),
    )


def _discrete_from_circle(
    *,
    ra_deg: float,
    dec_deg: float,
    radius_deg: float,
    tract_id: int,
    tract_overlap_deg: float,
    pixel_scale_arcsec: float,
    patch_inner_size: int,
    patch_border: int,
    projection: str,
) -> SkyMap:
    _check_common(pixel_scale_arcsec, patch_inner_size, patch_border, projection)
    if not (0 <= radius_deg < 80):
        raise ValueError(f"tract radius must be in [0, 80) deg, not {radius_deg}")
    if not (math.isfinite(tract_overlap_deg) and tract_overlap_deg >= 0):
        raise ValueError(f"tract_overlap_deg must be >= 0, not {tract_overlap_deg}")
    if not (-90.0 <= dec_deg <= 90.0 and math.isfinite(ra_deg)):
        raise ValueError(f"tract centre ({ra_deg}, {dec_deg}) is not a sky position")
    if tract_id < 0:
        raise ValueError(f"tract_id must be >= 0, not {tract_id}")
    scale = math.radians(pixel_scale_arcsec / 3600.0)
    rho = math.radians(radius_deg + tract_overlap_deg)
    half_px = float(_radial(np.array(rho), projection)) / scale
    box = _tract_box(half_px, patch_inner_size)
    frames = _frames_from_boxes(
        np.array([tract_id]),
        np.array([ra_deg % 360.0]),
        np.array([dec_deg]),
        [box],
        np.array([0]),
        pixel_scale_arcsec / 3600.0,
        patch_inner_size,
        projection,
    )
    params = {
        "tract_id": tract_id,
        "ra_deg": ra_deg,
        "dec_deg": dec_deg,
        "radius_deg": radius_deg,
        "tract_overlap_deg": tract_overlap_deg,
        "pixel_scale_arcsec": pixel_scale_arcsec,
        "patch_inner_size": patch_inner_size,
        "patch_border": patch_border,
        "projection": projection,
    }
    return SkyMap("discrete", params, frames)


# --------------------------------------------------------------------------- CCDs
def ccd_corners(registry_rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) RA and Dec of the header-WCS corners of each registry row.

    Raises ValueError naming a CCD without finite corners (a registry of an
    older version, or a calibration frame among the rows).
    """
    missing = [c for c in (*CORNER_RA_COLUMNS, *CORNER_DEC_COLUMNS) if c not in registry_rows]
    if missing:
        raise ValueError(f"registry has no footprint columns {', '.join(missing)}")
    ra = registry_rows[list(CORNER_RA_COLUMNS)].to_numpy(dtype=float)
    dec = registry_rows[list(CORNER_DEC_COLUMNS)].to_numpy(dtype=float)
    bad = ~(np.isfinite(ra).all(axis=1) & np.isfinite(dec).all(axis=1))
    if bad.any():
        first = int(np.argmax(bad))
        ids = " ".join(
            f"{col} {registry_rows[col].iloc[first]}"
            for col in ("visit", "detector")
            if col in registry_rows
        )
        raise ValueError(
            f"{int(bad.sum())} registry row(s) lack finite footprint corners, e.g. {ids} "
            "(calibration frames have none; an older registry must be re-created)"
        )
    return ra, dec


def ccd_patches(
    registry_rows: pd.DataFrame, skymap: SkyMap, margin_arcsec: float
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """The (tract, patch) list of every science CCD of ``registry_rows``.

    A CCD's footprint is its header-WCS corner polygon grown by
    ``margin_arcsec`` (the header WCS is only a pointing hint). Every CCD gets
    an entry, empty if it overlaps no patch. Vectorised over CCDs.
    """
    ra, dec = ccd_corners(registry_rows)
    poly, tract, patch = skymap.polygon_patches(ra, dec, margin_arcsec=margin_arcsec)
    visits = registry_rows["visit"].to_numpy(dtype=np.int64)
    detectors = registry_rows["detector"].to_numpy(dtype=np.int64)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {
        (int(v), int(d)): [] for v, d in zip(visits.tolist(), detectors.tolist(), strict=True)
    }
    if len(out) != len(registry_rows):
        raise ValueError("registry rows repeat a (visit, detector)")
    pairs = list(zip(tract.tolist(), patch.tolist(), strict=True))
    bounds = np.searchsorted(poly, np.arange(len(registry_rows) + 1))
    keys = list(zip(visits.tolist(), detectors.tolist(), strict=True))
    for i in np.flatnonzero(np.diff(bounds)).tolist():
        out[keys[i]] = pairs[bounds[i] : bounds[i + 1]]
    return out
