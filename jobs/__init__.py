"""The contract web and worker share: job schema, job store, worker directory, Celery app.

Light on purpose: no torch, no transformers, no Flask.
"""
