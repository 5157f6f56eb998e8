"""Admin API and dashboard (README.md, "Admin API" and "Dashboard"), served by the supervisor."""
