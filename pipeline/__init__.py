"""The driver side: configuration, data, the Ray run, tables, plots and the CLI."""
