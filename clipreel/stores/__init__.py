"""Persistence: the Parquet manifest, the Zarr feature store, run directories."""
