"""Run files and I/O: the run-directory layout, atomic writes, and Parquet appends."""
