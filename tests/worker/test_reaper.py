"""The reaper: orphaned running jobs, lost deliveries, stuck jobs (real Redis, fake clock where needed)."""

from datetime import timedelta

from jobs.schema import GenerateParameters, Job, JobStatus, new_job_id, utcnow
from jobs.store import QUEUED_KEY, JobStore
from jobs.workers import WorkerDirectory, WorkerInfo
from worker.housekeeping import LOST_DELIVERY_AFTER, STUCK_GRACE, Reaper


def _job(**extra) -> Job:
    return Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=2), **extra)


def _announce(redis_client, instance="tiny@h.cpu:1", model="tiny"):
    info = WorkerInfo(name=instance.split(":")[0], instance=instance, model=model, host="h", device="cpu",
                      dtype="float32", pid=1)
    WorkerDirectory(redis_client).announce(info, ttl_seconds=30)


def _reaper(redis_client, store, sent):
    return Reaper(store, WorkerDirectory(redis_client), lambda job: sent.append(job.id), interval=1)


def test_a_job_whose_delivery_was_lost_is_sent_again(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    _announce(redis_client)
    sent = []
    reaper = _reaper(redis_client, store, sent)
    reaper._reap()
    assert sent == []  # queued only just now
    redis_client.zadd(QUEUED_KEY, {job.id: 0})  # as if queued long ago, its message taken by a dead worker
    redis_client.lpush("bloomq.tiny", "another job's message")
    reaper._reap()
    assert sent == []  # its queue is not empty: the message may simply be waiting there
    redis_client.delete("bloomq.tiny")
    reaper._reap()
    assert sent == [job.id]
    reaper._reap()
    assert sent == [job.id]  # not again until LOST_DELIVERY_AFTER has passed once more
    assert redis_client.zscore(QUEUED_KEY, job.id) > LOST_DELIVERY_AFTER


def test_an_orphaned_running_job_is_requeued(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "tiny@dead.cpu", "tiny@dead.cpu:9")
    _announce(redis_client)
    sent = []
    _reaper(redis_client, store, sent)._reap()
    assert sent == [job.id] and store.get(job.id).status is JobStatus.QUEUED


def test_a_job_running_long_past_its_deadline_on_a_live_worker_is_failed(redis_client):
    store = JobStore(redis_client, 100)
    job = _job(deadline=utcnow() + timedelta(hours=1))
    store.create(job)
    store.start(job.id, "tiny@h.cpu", "tiny@h.cpu:1")
    past = utcnow() - timedelta(seconds=STUCK_GRACE + 5)
    store._update(job.id, lambda j: j.model_copy(update={"deadline": past}))  # the clock moved on
    _announce(redis_client)
    sent = []
    _reaper(redis_client, store, sent)._reap()
    failed = store.get(job.id)
    assert sent == [] and failed.status is JobStatus.FAILED and failed.error.type == "timeout"
