"""Pure numerical estimators (numpy only, no I/O)."""
