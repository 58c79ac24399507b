"""The dashboard: a web UI and a Prometheus endpoint for a cluster, served by a process of
its own (aiohttp) that reads the state API on demand and keeps no history.

Started by `redray start --head --include-dashboard` (or `init(include_dashboard=True)`);
`redray start/node --metrics-export-port PORT` starts a node's Prometheus exporter, the same
program serving only that node's metrics. Needs the `dashboard` extra
(`pip install 'redray[dashboard]'`: aiohttp and prometheus_client).
"""
