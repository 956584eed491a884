"""Single-frame processing: raw amplifiers to a calibrated exposure (calexp) per CCD.

The stage of LSST's ``processCcd`` (``isr``, ``characterizeImage``,
``calibrate``): master calibrations (``master_calibs``: ``constructBias``,
``constructDark``, ``constructFlat``), instrument signature removal (``isr``,
``cosmic_rays``), background and detection (``background``, ``detection``), the
PSF model (``psf``: ``measurePsf`` with a PSFEx-like pixel model), source
measurement and aperture correction (``measure``), astrometric and photometric
calibration against a reference catalog (``refcat``, ``astrometry``,
``photocal``), and ``calibrate``, which runs them in order for one CCD.
"""
