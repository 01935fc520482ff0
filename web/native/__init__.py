"""bloomq's own API: /api/v1 (jobs, models, workers), health, metrics, and the OpenAPI document."""
