"""SQL views shipped with runs-etl; the package exists so the views travel inside the wheel."""
