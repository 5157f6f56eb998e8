"""The Cython data plane. Every module listed here must be a compiled extension."""
MODULES = ("buffer", "timer", "shm", "health", "uri", "router", "http1", "upstream", "balancer", "proxyproto",
           "sni", "tcp", "native", "ratelimit", "cache", "filters",
           "request", "answers", "observe", "retry", "protocol")
