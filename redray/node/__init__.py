"""The node daemon's parts: worker pool, scheduling, bundles, object transfers, and starting nodes.

Runs in each machine's raylet process (assembled by `redray.raylet.Raylet`); `launch` runs in
whoever starts a node (`redray start`, `init()`).
"""
