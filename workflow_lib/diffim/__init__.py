"""Difference imaging: each calexp minus its template, and the DIASources found on it.

LSST's ``imageDifference`` (dia_pipe's ``imageDifferenceDriver``): the template
coadd warped to the calexp, PSF-matched by an Alard-Lupton kernel (with
decorrelation) or by ZOGY, subtracted, and the difference image's sources
detected and measured (``DiaSource``).
"""
