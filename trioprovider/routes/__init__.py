"""HTTP routes, one module per API surface; thin shells over the wire formats and RequestScope."""
