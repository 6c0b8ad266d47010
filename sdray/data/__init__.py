"""Data sets and on-disk contracts: the synthetic captioned scenes, parquet I/O helpers."""
