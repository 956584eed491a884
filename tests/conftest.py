"""Shared test helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from workflow_lib.io import write_image_file, write_raw_file

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TINY = {"sim": {"preset": "tiny", "seed": 7}}


def snakemake(run_dir: Path, config: dict, *args: str, check: bool = True):
    """Run the repository's workflow in ``run_dir`` with ``config`` as override file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    configfile = run_dir / "override.yaml"
    configfile.write_text(yaml.safe_dump(config))
    command = [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(run_dir),
        "--configfile",
        str(configfile),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny survey simulated and ingested by a real snakemake run."""
    run_dir = tmp_path_factory.mktemp("tiny")
    snakemake(run_dir, TINY, "--cores", "2")
    return run_dir


def fake_primary(**overrides: object) -> fits.Header:
    """A CONTRACT-complete primary header of a science exposure; None removes a key."""
    cards: dict[str, object] = {
        "OBSTYPE": "science",
        "EXPID": 159400,
        "DETECTOR": 3,
        "FILTER": "r",
        "MJD-OBS": 60600.1,
        "EXPTIME": 30.0,
        "RA": 56.0,
        "DEC": -30.0,
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 56.0,
        "CRVAL2": -30.0,
        "CRPIX1": 16.5,
        "CRPIX2": 8.5,
        "CD1_1": -5.5e-5,
        "CD1_2": 0.0,
        "CD2_1": 0.0,
        "CD2_2": 5.5e-5,
    }
    cards.update(overrides)
    header = fits.Header()
    for key, value in cards.items():
        if value is not None:
            header[key] = value
    return header


def fake_amplifiers(**overrides: object) -> list[tuple[np.ndarray, fits.Header]]:
    """Two 16x8 amplifiers (prescan 2, overscan 4 columns), the second flipped in x."""
    amps = []
    for index, detsec in enumerate(["[1:16,1:8]", "[32:17,1:8]"]):
        header = fits.Header()
        header.update(
            EXTNAME=f"Segment{index}",
            DATASEC="[3:18,1:8]",
            BIASSEC="[19:22,1:8]",
            DETSEC=detsec,
            GAIN=1.5,
            RDNOISE=5.0,
            SATURATE=60000.0,
        )
        for key, value in overrides.items():
            if value is None:
                del header[key]
            else:
                header[key] = value
        amps.append((np.full((8, 22), 1000 + index, dtype=np.int32), header))
    return amps


@pytest.fixture
def write_fake_raw():
    """Factory writing a small raw file; keyword overrides go to the primary header."""

    def write(path: Path, *, amp_overrides: dict | None = None, **primary: object) -> Path:
        write_raw_file(path, fake_primary(**primary), fake_amplifiers(**(amp_overrides or {})))
        return path

    return write


@pytest.fixture
def write_fake_eimage():
    def write(path: Path, **primary: object) -> Path:
        header = fake_primary(**{"GAIN": 1.0, **primary})
        write_image_file(path, header, [], primary_data=np.ones((8, 32), dtype=np.float32))
        return path

    return write
