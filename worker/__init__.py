"""The bloomq worker process (``python -m worker``), over two libraries of its own.

- ``worker.engine``: the continuous-batching engine (scheduler, KV blocks, attention, sampling, text):
  torch and transformers only, usable in-process.
- ``worker.model``: how a checkpoint becomes tensors on devices (loading, sharding, quantization,
  placement, the tensor-parallel group, the tiny test checkpoint).

The modules here are the process around them, in the order a job meets them:

- ``launcher``: ``python -m worker``; reads the GPUs, plans placements, starts one process per GPU or group;
- ``supervisor``: restarts a process that dies, backs off, stops a crash loop;
- ``serve``: one process: loads the model, builds the engine, joins Celery, starts the threads below;
- ``tasks``: the Celery tasks (thin: a job id in, the runner does the rest; webhooks delivered);
- ``feeder``: takes batch lines from their per-key lists while the engine has room;
- ``runner``: one job through the store around the engine (start, progress, cancel, one final result);
- ``progress``: streams every running job's new text to Redis, a few times a second;
- ``liveness``: the heartbeat, the cancel listener;
- ``recovery``: jobs of dead workers and lost messages back in the queue, jobs past their deadline failed.
"""
