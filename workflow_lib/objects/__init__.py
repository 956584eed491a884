"""Objects: detection, deblending and measurement on the deep coadds, and forced photometry.

LSST's ``detectCoaddSources``, ``mergeCoaddDetections``, ``deblendCoaddSources``
and ``measureCoaddSources`` / ``mergeCoaddMeasurements`` (``measure_objects``,
``deblend``), then ``forcedPhotCcd`` (``forced``): every primary Object
measured at its fixed position on every calexp it falls on.
"""
