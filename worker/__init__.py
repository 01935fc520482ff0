"""The bloomq worker: launcher, Celery task, model loading and the generation engine."""
