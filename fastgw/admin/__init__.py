"""Admin API (SPEC.md §7) and dashboard (§8), served by the supervisor."""
