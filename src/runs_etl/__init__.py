"""runs-etl: mirror every run of a Noxus workspace into DuckDB and Parquet."""
__version__ = "0.1.0"
