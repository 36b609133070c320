"""The driver side: the run engine (run/), the study commands (studies/), reports (report/) and the CLI."""
