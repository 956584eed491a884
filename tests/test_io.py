"""FITS and table I/O: atomic writes, byte order, the CONTRACT image layout."""

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from workflow_lib.core.exposure import Exposure, MaskPlanes, PhotoCalib
from workflow_lib.core.psf_model import PsfModel
from workflow_lib.io import atomic_output, read_table, write_csv, write_table
from workflow_lib.io.exposure import read_exposure, write_exposure
from workflow_lib.io.tables import read_provenance


def _tan_sip_wcs() -> WCS:
    header = fits.Header()
    header.update(
        CTYPE1="RA---TAN-SIP",
        CTYPE2="DEC--TAN-SIP",
        CRVAL1=55.9,
        CRVAL2=-29.8,
        CRPIX1=-300.0,
        CRPIX2=812.5,
        CD1_1=-5.5e-5,
        CD1_2=1.0e-6,
        CD2_1=1.0e-6,
        CD2_2=5.5e-5,
        A_ORDER=3,
        B_ORDER=3,
        A_3_0=2e-9,
        A_1_2=2e-9,
        B_0_3=2e-9,
        B_2_1=2e-9,
    )
    return WCS(header)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "x.parquet"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_exposure_round_trip_big_endian_nonzero_origin(tmp_path):
    rng = np.random.default_rng(42)
    image = rng.normal(size=(40, 50)).astype(">f4")  # big-endian on purpose
    variance = np.full((40, 50), 2.0, dtype=">f8")
    yy, xx = np.mgrid[-10:11, -10:11]
    basis = np.stack(
        [np.exp(-(xx**2 + yy**2) / 8.0), 0.1 * np.exp(-(xx**2 + yy**2) / 6.0), np.zeros((21, 21))]
    )
    psf = PsfModel(basis, order=1, x_center=25, y_center=20, x_scale=25, y_scale=20)
    exposure = Exposure(
        image,
        variance,
        np.zeros((40, 50)),
        wcs=_tan_sip_wcs(),
        psf=psf,
        photo_calib=PhotoCalib(1.0, zero_point=28.3),
        origin=(1000, -20),
    )
    exposure.set_mask("SAT", image > 1.5)
    exposure.set_mask("MY_PLANE", image < -2)
    path = tmp_path / "calexp.fits"
    write_exposure(exposure, path, provenance={"inputs": ["raw.fits"]})

    back = read_exposure(path)
    assert back.image.dtype.isnative and back.variance.dtype.isnative
    np.testing.assert_array_equal(back.image, image.astype(np.float32))
    np.testing.assert_array_equal(back.mask_of("SAT"), image > 1.5)
    np.testing.assert_array_equal(back.mask_of("MY_PLANE"), image < -2)
    assert back.origin == (1000, -20)
    assert back.photo_calib.zero_point == pytest.approx(28.3)
    np.testing.assert_allclose(back.psf.kernel_at(3, 7), psf.kernel_at(3, 7))
    # The full SIP WCS survives: compare pixel -> sky at the corners.
    corners = np.array([[0, 0], [49, 0], [0, 39], [49, 39]], dtype=float)
    np.testing.assert_allclose(
        back.wcs.all_pix2world(corners, 0), exposure.wcs.all_pix2world(corners, 0), atol=1e-10
    )


def test_exposure_file_is_readable_with_astropy_alone(tmp_path):
    exposure = Exposure(np.ones((5, 6)), np.ones((5, 6)), np.zeros((5, 6)), wcs=_tan_sip_wcs())
    exposure.set_mask("CR", np.eye(5, 6, dtype=bool))
    exposure.psf = PsfModel.constant(np.ones((3, 3)))
    write_exposure(exposure, tmp_path / "e.fits")
    with fits.open(tmp_path / "e.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        for name in ("IMAGE", "MASK", "VARIANCE"):
            assert hdul[name].header["CTYPE1"] == "RA---TAN-SIP"
        mask_header = hdul["MASK"].header
        for plane in ("BAD", "SAT", "CR", "EDGE", "NO_DATA", "DETECTED", "INTRP"):
            assert f"MP_{plane}" in mask_header
        cr_bit = mask_header["MP_CR"]
        assert np.all(((hdul["MASK"].data >> cr_bit) & 1)[np.eye(5, 6, dtype=bool)] == 1)
        assert hdul["PSF"].header["PSFTYPE"] == "POLYPIX"


def test_foreign_mask_bits_are_translated(tmp_path):
    exposure = Exposure(np.zeros((4, 4)), np.ones((4, 4)), np.zeros((4, 4)))
    exposure.mask_planes = MaskPlanes({"SAT": 7, "BAD": 2})  # another writer's bit order
    exposure.mask[1, 1] = 1 << 7
    write_exposure(exposure, tmp_path / "x.fits")
    back = read_exposure(tmp_path / "x.fits")
    assert back.mask_of("SAT")[1, 1] and back.mask_of("SAT").sum() == 1
    assert back.mask_planes.bits["SAT"] == MaskPlanes().bits["SAT"]


def test_tables_round_trip_with_provenance(tmp_path):
    table = pd.DataFrame({"a": np.arange(3, dtype=np.int64), "b": [0.5, 1.5, np.nan]})
    write_table(table, tmp_path / "t.parquet", provenance={"step": "x", "version": 1})
    pd.testing.assert_frame_equal(read_table(tmp_path / "t.parquet"), table)
    assert read_provenance(tmp_path / "t.parquet") == {"step": "x", "version": 1}


def test_phosim_csv_header_is_understood(tmp_path):
    table = pd.DataFrame({"uniqueId": [1, 2], "raJ2000": [10.0, 10.1], "lsst_r": [18.0, 19.0]})
    write_csv(table, tmp_path / "ref.csv", header_prefix="#")
    assert (tmp_path / "ref.csv").read_text().startswith("#uniqueId,")
    back = read_table(tmp_path / "ref.csv")
    assert list(back.columns) == ["uniqueId", "raJ2000", "lsst_r"]


def test_fits_table_is_read_in_native_order(tmp_path):
    from astropy.table import Table

    Table({"ra": np.array([1.0, 2.0], dtype=">f8")}).write(tmp_path / "t.fits")
    back = read_table(tmp_path / "t.fits")
    assert back["ra"].to_numpy().dtype.isnative
    assert back["ra"].tolist() == [1.0, 2.0]
