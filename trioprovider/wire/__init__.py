"""Wire formats: client requests in, events out as SSE, NDJSON or JSON. Pure, no I/O."""
