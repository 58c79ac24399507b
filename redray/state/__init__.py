"""The cluster's state for users and tools: tasks, actors, objects, nodes, jobs, placement
groups, workers, logs and user metrics, read from Redis and from the nodes (`redray.util.state`
re-exports the API with Ray's names)."""
