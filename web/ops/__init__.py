"""What operators read: Prometheus metrics."""
