"""Pure, vectorized steps of the data flow; each is a plain function over polars frames, testable alone."""
