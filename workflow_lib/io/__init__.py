"""All file reading and writing of the project lives here.

FITS data are converted to native byte order once, on read, because ``sep`` and
many numpy fast paths reject big-endian arrays. Every write goes to a temporary
name in the destination directory and is renamed into place, so an interrupted
job never leaves a product that looks complete.
"""

from workflow_lib.io.atomic import atomic_output
from workflow_lib.io.fits import (
    read_header,
    read_headers,
    read_image_hdus,
    to_native,
    write_image_file,
    write_raw_file,
)
from workflow_lib.io.tables import (
    read_table,
    read_tables,
    write_concatenated,
    write_csv,
    write_table,
)

__all__ = [
    "atomic_output",
    "read_header",
    "read_headers",
    "read_image_hdus",
    "read_table",
    "read_tables",
    "to_native",
    "write_concatenated",
    "write_csv",
    "write_image_file",
    "write_raw_file",
    "write_table",
]
