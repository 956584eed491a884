"""Truth-free survey metrics (PA1, AM1) and the check-metrics regression gate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow_lib.cli import main
from workflow_lib.qa.check import check_metrics, lookup
from workflow_lib.qa.survey_metrics import (
    astrometric_repeatability,
    bright_point_sources,
    match_across_visits,
    photometric_repeatability,
)


def star_sources(
    *, n_stars: int = 400, n_visits: int = 6, mag_sigma: float = 0.010, pos_sigma_mas: float = 10.0
) -> pd.DataFrame:
    """Bright stars over a 15' field seen in every visit, with known scatter."""
    rng = np.random.default_rng(3)
    ra0, dec0 = 150.0, 2.0
    ra = ra0 + rng.uniform(-7.5, 7.5, n_stars) / 60.0 / np.cos(np.deg2rad(dec0))
    dec = dec0 + rng.uniform(-7.5, 7.5, n_stars) / 60.0
    flux = 10 ** rng.uniform(4.5, 6, n_stars)
    rows = []
    for visit in range(n_visits):
        jitter = rng.normal(0.0, pos_sigma_mas / 3.6e6, (2, n_stars))
        measured = flux * 10 ** (-0.4 * rng.normal(0.0, mag_sigma, n_stars))
        rows.append(
            pd.DataFrame(
                {
                    "visit": visit,
                    "band": "r",
                    "ra": ra + jitter[0] / np.cos(np.deg2rad(dec)),
                    "dec": dec + jitter[1],
                    "psfFlux": measured,
                    "psfFluxErr": measured / 500.0,
                    "extendedness": 0.0,
                    "flags": 0,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_pa1_and_am1_recover_the_injected_scatter():
    matched = match_across_visits(bright_point_sources(star_sources()))
    assert (matched["star"] >= 0).all() and matched["star"].nunique() == 400
    pa1 = photometric_repeatability(matched)["r"]
    assert pa1["n_stars"] == 400 and abs(pa1["rms"] - 10.0) < 0.6
    am1 = astrometric_repeatability(matched)
    # A separation's error along the pair: two stars' 10-mas errors in quadrature.
    assert am1["n_pairs"] > 1000 and abs(am1["median_rms_mas"] / (10.0 * np.sqrt(2)) - 1) < 0.1


def test_am1_is_absent_on_a_field_narrower_than_its_annulus():
    sources = star_sources()  # 15' square -> 2.5' square: its diagonal (3.5') < 4'
    narrow = sources.assign(ra=150 + (sources["ra"] - 150) / 6, dec=2 + (sources["dec"] - 2) / 6)
    am1 = astrometric_repeatability(match_across_visits(narrow))
    assert am1["n_pairs"] == 0 and np.isnan(am1["median_rms_mas"])


def test_two_sources_of_one_visit_make_an_ambiguous_star():
    sources = star_sources(n_stars=20, n_visits=3)
    twin = sources.iloc[[0]].assign(ra=sources["ra"].iloc[0] + 0.2 / 3600)
    matched = match_across_visits(pd.concat([sources, twin], ignore_index=True))
    star = matched.loc[0, "star"]
    assert star == -1 and (matched["star"] >= 0).sum() == len(sources) - 3


def test_faint_extended_and_flagged_sources_are_not_bright_point_sources():
    sources = star_sources(n_stars=10, n_visits=1)
    sources.loc[0, "extendedness"] = 1.0
    sources.loc[1, "psfFluxErr"] = sources.loc[1, "psfFlux"] / 20.0
    sources.loc[2, "flags"] = 1 << 62 | 0xFFFF
    assert len(bright_point_sources(sources)) == 7


METRICS = {
    "survey": {"PA1_mmag": {"r": {"robust": 9.0}}, "AM1_mas": {"r": {"median_rms_mas": None}}},
    "truth": {
        "single_frame": {"pa1_mmag_by_min_snr": {"50.0": {"robust": 10.2}}},
        "static_sky": {"purity": {"passed": False}},
    },
}


def test_check_metrics_bounds_absent_null_and_dotted_keys():
    assert lookup(METRICS, "truth.single_frame.pa1_mmag_by_min_snr.50.0.robust") == 10.2
    checks = check_metrics(
        METRICS,
        {
            "survey.PA1_mmag.r.robust": {"max": 10},
            "survey.AM1_mas.r.median_rms_mas": {"max": 10},
            "survey.PA1_mmag.g.robust": {"max": 10},
            "truth.single_frame.pa1_mmag_by_min_snr.50.0.robust": {"min": 5, "max": 10},
            "truth.static_sky.purity.passed": {"min": 1},
        },
    )
    assert [c.passed for c in checks] == [True, False, False, False, False]
    assert "absent" in checks[1].describe() and checks[0].describe().startswith("ok")
    with pytest.raises(ValueError, match="min and/or max"):
        check_metrics(METRICS, {"survey.PA1_mmag.r.robust": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        check_metrics(METRICS, {"survey.PA1_mmag.r.robust": {"max": 3, "mx": 2}})


def test_check_metrics_command_exit_codes(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    good, bad, broken = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "broken.yaml"
    good.write_text(yaml.safe_dump({"survey.PA1_mmag.r.robust": {"max": 10}}))
    bad.write_text(yaml.safe_dump({"survey.PA1_mmag.r.robust": {"max": 5}}))
    broken.write_text("- a list\n")
    assert main(["check-metrics", str(metrics), "--thresholds", str(good)]) == 0
    assert main(["check-metrics", str(metrics), "--thresholds", str(bad)]) == 1
    assert "FAIL survey.PA1_mmag.r.robust = 9" in capsys.readouterr().out
    assert main(["check-metrics", str(metrics), "--thresholds", str(broken)]) == 2
    assert main(["check-metrics", str(tmp_path / "none.json"), "--thresholds", str(good)]) == 2


def test_progress_is_logged_at_intervals_and_at_the_end(caplog):
    import logging

    from workflow_lib.core.timing import ProgressLog

    logger = logging.getLogger("progress-test")
    with caplog.at_level(logging.INFO, logger="progress-test"):
        progress = ProgressLog(logger, "header scan", total=5, interval_s=3600.0)
        for _ in range(5):
            progress.step()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("header scan: 5 of 5 (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="progress-test"):
        progress = ProgressLog(logger, "tables", total=3, interval_s=0.0)
        for _ in range(3):
            progress.step()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "tables: 1 of 3",
        "tables: 2 of 3",
        "tables: 3 of 3",
    ]


def _dia_tables():
    """Two subtracted CCD-visits (one skipped); a transient found once of twice, a false
    DIASource at a static star and one on empty sky."""
    truth = pd.DataFrame(
        {
            "id": [1, 2],
            "kind": ["transient", "star"],
            "ra": [150.0, 150.01],
            "dec": [2.0, 2.0],
        }
    )
    lightcurve = pd.DataFrame(
        {
            "id": [1, 1, 1],
            "visit": [10, 11, 12],
            "detector": [0, 0, 0],
            "band": ["r", "r", "r"],
            "mjd": [60620.0, 60640.0, 60641.0],
            "flux": [0.0, 5000.0, 5000.0],
        }
    )
    ccd = pd.DataFrame(
        {"visit": [10, 11, 12], "detector": [0, 0, 0], "failed": [False, False, True]}
    )
    sources = pd.DataFrame(
        {
            "visit": [11, 10, 11],
            "detector": [0, 0, 0],
            "ra": [150.0, 150.01 + 0.5 / 3600, 150.02],
            "dec": [2.0, 2.0, 2.0],
            "psfFluxErr": [100.0, 100.0, 100.0],
            "snr": [50.0, 6.0, 5.5],
            "flags": [0, 0, 0],
        }
    )
    return sources, ccd, truth, lightcurve


def test_dia_efficiency_counts_true_flux_changes_on_subtracted_ccd_visits():
    from workflow_lib.qa.dia_metrics import detection_efficiency

    sources, ccd, truth, lightcurve = _dia_tables()
    eff = detection_efficiency(sources, ccd, truth, lightcurve, template_window=(None, 60630.0))
    # Visit 10 (true difference 0) and 11 (S/N 50, found) count; 12 was not subtracted.
    assert eff["n_points"] == 2
    by_bin = {b["snr_min"]: (b["n"], b["n_detected"]) for b in eff["bins"]}
    assert by_bin[0.0] == (1, 0) and by_bin[50.0] == (1, 1)
    assert eff["efficiency_snr_gt_10"] == 1.0


def test_false_positives_per_ccd_visit_and_at_static_objects():
    from workflow_lib.qa.dia_metrics import false_positives

    sources, ccd, truth, _ = _dia_tables()
    fp = false_positives(sources, ccd, truth)
    assert fp["n_total"] == 2 and fp["n_at_static_objects"] == 1
    assert fp["per_ccd_visit"] == [1, 1] and fp["n_ccd_visits"] == 2


def test_ccd_visit_page_lists_flagged_and_failed_ccd_visits(tmp_path):
    from workflow_lib.core.flags import CcdVisitFlag
    from workflow_lib.io import write_table
    from workflow_lib.steps.qa import plot_ccd_visits

    flags = [0, int(CcdVisitFlag.FAILED | CcdVisitFlag.PSF_FAILED), int(CcdVisitFlag.PSF_FALLBACK)]
    table = pd.DataFrame(
        {
            "visit": [1, 1, 2],
            "detector": [0, 1, 0],
            "band": ["r", "r", "g"],
            "midpointMjdTai": [60620.0, 60620.0, 60621.0],
            "seeing": [0.8, np.nan, 0.9],
            "zeroPoint": [28.3, np.nan, 28.4],
            "skyBg": [900.0, np.nan, 400.0],
            "astromRms": [0.012, np.nan, 0.015],
            "flags": flags,
            "failReason": ["", "PSF model: only 3 usable PSF stars (need >= 5)", ""],
        }
    )
    write_table(table, tmp_path / "CcdVisit.parquet")
    plot, page = tmp_path / "q.png", tmp_path / "failed.html"
    plot_ccd_visits(
        ccdvisit_table_path=str(tmp_path / "CcdVisit.parquet"),
        plot_path=str(plot),
        failed_path=str(page),
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert "1 of 3 CCD-visits not calibrated, 1 calibrated with flags" in html
    assert "FAILED, PSF_FAILED" in html and "PSF_FALLBACK" in html and "only 3 usable" in html


def test_a_failing_step_writes_its_traceback_to_the_job_log(tmp_path):
    import logging
    from types import SimpleNamespace

    from workflow_lib.steps.runner import run_snakemake_job

    class Named(dict):  # what the runner uses of Snakemake's named lists: items()
        pass

    log_path = tmp_path / "job.log"
    smk = SimpleNamespace(
        rule="qa_ccd_visits",
        threads=1,
        log=[str(log_path)],
        input=Named(ccdvisit_table_path=str(tmp_path / "no_such_CcdVisit.parquet")),
        output=Named(plot_path=str(tmp_path / "a.png"), failed_path=str(tmp_path / "b.html")),
        params=Named(step="qa:plot_ccd_visits"),
        wildcards=Named(),
    )
    try:
        with pytest.raises(OSError):
            run_snakemake_job(smk)
    finally:
        logging.getLogger().handlers.clear()
    text = log_path.read_text()
    assert "step qa:plot_ccd_visits failed" in text and "Traceback" in text
    assert "no_such_CcdVisit.parquet" in text
