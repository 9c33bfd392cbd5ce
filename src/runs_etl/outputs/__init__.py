"""What readers get from the warehouse: Parquet exports, the HTML report and ``status``."""
