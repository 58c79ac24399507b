"""redray: a lightweight, Redis-backed task and actor runtime with Ray core's API."""
