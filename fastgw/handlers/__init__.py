"""Request handlers that answer a route themselves instead of proxying it (e.g. gRPC transcoding)."""
