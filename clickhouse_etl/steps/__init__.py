"""Vectorized stages of the data flow, driven by a pipeline model: plain functions over polars frames and clients."""
