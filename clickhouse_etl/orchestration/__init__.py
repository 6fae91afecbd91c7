"""Dagster wiring: resources over the clients, ops over the steps, job and sensor factories per pipeline,
asset checks, the run-tag vocabulary, and the Definitions of the code location."""
