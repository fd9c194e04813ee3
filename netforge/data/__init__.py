"""Data: LMDB access, Datum helpers, the DataTransformer and the MNIST converters."""

from netforge.data.datum import array_to_datum, datum_to_array
from netforge.data.db import LmdbReader, LmdbWriter, check_lmdb_path
from netforge.data.transformer import DataTransformer, load_blob_proto, load_mean_file

__all__ = [
    "DataTransformer",
    "LmdbReader",
    "LmdbWriter",
    "array_to_datum",
    "check_lmdb_path",
    "datum_to_array",
    "load_blob_proto",
    "load_mean_file",
]
