"""The control plane: the leader-elected loop that places actors and groups and detects deaths.

Runs in head raylets; only the one holding the leadership lease in Redis acts.
"""
