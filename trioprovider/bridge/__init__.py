"""The bridge: where agents register and model requests are routed to them."""
