"""The running processor's telemetry: log lines, the report of what it published, the
Prometheus metrics and the health endpoint (/metrics, /healthz, /readyz), the group's lag."""
