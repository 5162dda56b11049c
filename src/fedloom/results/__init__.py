"""Run results: the SQLite state database, metrics, plots and summaries."""
