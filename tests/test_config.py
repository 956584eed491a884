"""Configuration: schema defaults, one-line errors, DC2 id syntax, cross-field checks."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from workflow_lib.core.config import (
    ConfigError,
    load_config,
    parse_band_selection,
    parse_id_selection,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_empty_config_gets_every_default():
    cfg = validate_config({})
    assert cfg["output_dir"] == "results"
    assert cfg["input"]["source"] == "simulated"
    assert cfg["input"]["refcat_columns"]["ra"] == "ra"
    # No FWHM cut or template season of our simulator's: relative to the survey's seeing.
    assert cfg["template"]["max_psf_fwhm"] is None and cfg["template"]["mjd_max"] is None
    assert (cfg["template"]["seeing_quantile"], cfg["template"]["min_images"]) == (0.33, 6)
    assert cfg["template"]["warp_type"] == "direct"
    assert cfg["select"] == {"visit": None, "detector": None, "band": None, "tract": None}
    # DC2's makeSkyMapConfig.py
    assert cfg["skymap"]["rings"]["num_rings"] == 120
    assert (cfg["skymap"]["patch_inner_size"], cfg["skymap"]["patch_border"]) == (4000, 100)


def test_model_psf_defaults_to_the_template_cut_and_may_not_be_narrower():
    assert load_config({"template": {"max_psf_fwhm": 1.1}}).coadd.model_psf_fwhm_arcsec == 1.1
    assert load_config({"coadd": {"model_psf_fwhm_arcsec": 1.2}}).coadd.model_psf_fwhm_arcsec == 1.2
    assert load_config({}).coadd.model_psf_fwhm_arcsec is None  # direct-warp templates
    message = r"coadd.model_psf_fwhm_arcsec \(0.8\).*max_psf_fwhm \(0.9\)"
    with pytest.raises(ConfigError, match=message):
        load_config({"coadd": {"model_psf_fwhm_arcsec": 0.8}, "template": {"max_psf_fwhm": 0.9}})
    with pytest.raises(ConfigError, match=r"template\.warp_type psf_matched needs a model PSF"):
        load_config({"template": {"warp_type": "psf_matched"}})


def test_the_simulated_survey_takes_its_template_season_where_the_window_is_open():
    from workflow_lib.workflow import with_simulated_template_season as season

    assert season(validate_config({}))["template"]["mjd_max"] == 60630.0
    raw = {"input": {"source": "raw", "raw_dir": "d", "refcat": "r.csv"}}
    assert season(validate_config(raw))["template"]["mjd_max"] is None
    given = season(validate_config({"template": {"mjd_min": 60000.0}}))["template"]
    assert (given["mjd_min"], given["mjd_max"]) == (60000.0, None)  # a window given is kept


def test_template_selection_is_relative_unless_a_fwhm_cut_is_set():
    relative = load_config({}).template.selection()
    assert relative["max_psf_fwhm"] is None
    assert (relative["seeing_quantile"], relative["min_images"]) == (0.33, 6)
    # The CONTRACT's keys (an absolute cut) select as they say: no quantile on top.
    absolute = load_config({"template": {"max_psf_fwhm": 0.9, "mjd_max": 60630.0}}).template
    assert absolute.selection() == {
        "mjd_min": None,
        "mjd_max": 60630.0,
        "max_psf_fwhm": 0.9,
        "max_images": 10,
        "seeing_quantile": None,
        "min_images": 0,
    }


def test_reference_band_priority_lists_each_band_once():
    with pytest.raises(ConfigError, match="ref_band_priority"):
        load_config({"objects": {"ref_band_priority": ["i", "r", "i"]}})
    with pytest.raises(ConfigError, match="skymap"):
        load_config({"skymap": {"kind": "healpix"}})


def test_validation_does_not_modify_the_input():
    raw = {"input": {"source": "simulated"}}
    validate_config(raw)
    assert raw == {"input": {"source": "simulated"}}


def test_repository_config_is_valid():
    load_config(yaml.safe_load((REPO / "config.yaml").read_text()))


def test_contract_section4_example_is_valid():
    example = yaml.safe_load(
        """
input:
  source: raw
  raw_dir: /data/survey/raw
  refcat: /data/survey/refcat.csv
  refcat_columns:
    id: uniqueId
    ra: raJ2000
    dec: decJ2000
    is_star: starnotgal
    is_variable: isvariable
    mags: {g: lsst_g, r: lsst_r, i: lsst_i}
template:
  mjd_min: null
  mjd_max: 60630.0
  max_psf_fwhm: 0.9
  max_images: 10
output_dir: results
"""
    )
    cfg = load_config(example)
    assert cfg.input.refcat_columns.mags == {"g": "lsst_g", "r": "lsst_r", "i": "lsst_i"}
    assert cfg.image_format == "raw"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"outptu_dir": "x"}, "config: outptu_dir: unknown key"),
        ({"input": {"sourse": "raw"}}, "config: input.sourse: unknown key"),
        ({"input": {"source": "tape"}}, "config: input.source:"),
        ({"input": {"source": "raw", "refcat": "r.csv"}}, "config: input.raw_dir: required"),
        ({"input": {"source": "raw", "raw_dir": "d"}}, "config: input.refcat: required"),
        ({"select": {"visit": "840..8x"}}, "config: select.visit:"),
        ({"select": {"band": "g^q"}}, "config: select.band:"),
        ({"sim": {"seed": -1}}, "config: sim.seed:"),
        ({"template": {"mjd_min": 60700, "mjd_max": 60600}}, "config: template: mjd_min"),
        ({"template": {"max_psf_fwhm": 0}}, "config: template.max_psf_fwhm:"),
        ({"association": {"method": "nearest"}}, "config: association.method:"),
        ({"association": {"radius_arcsec": -1.0}}, "config: association.radius_arcsec:"),
        ({"association": {"band": "g^q"}}, "config: association.band:"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(config, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_dc2_id_syntax():
    assert parse_id_selection("840..843") == (840, 841, 842, 843)
    assert parse_id_selection("840..846:3^900") == (840, 843, 846, 900)
    assert parse_id_selection(7) == (7,)
    assert parse_id_selection([5, 3, 5]) == (3, 5)
    assert parse_id_selection(None) is None
    with pytest.raises(ConfigError):
        parse_id_selection("850..840")
    assert parse_band_selection("i^g") == ("g", "i")
    assert parse_band_selection(["r"]) == ("r",)


@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 50), st.integers(1, 5)),
        min_size=1,
        max_size=5,
    )
)
def test_id_syntax_matches_python_ranges(pieces):
    text = "^".join(f"{a}..{a + n}:{s}" for a, n, s in pieces)
    expected = sorted({v for a, n, s in pieces for v in range(a, a + n + 1, s)})
    assert list(parse_id_selection(text)) == expected
    # The schema accepts exactly what the parser accepts.
    validate_config({"select": {"visit": text}})


def test_calibrate_cross_field_checks():
    with pytest.raises(ConfigError, match="psf_kernel_size: must be odd"):
        validate_config({"calibrate": {"psf_kernel_size": 40}})
    with pytest.raises(ConfigError, match="calib_aperture_radius_arcsec: must be at least"):
        validate_config(
            {"calibrate": {"ap_flux_radius_arcsec": 3.0, "calib_aperture_radius_arcsec": 2.0}}
        )
