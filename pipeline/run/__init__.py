"""The run engine: config, data, preflight, the driver, scheduler and Ray groups, and the run folder it records."""
