from jobs.schema import GenerateParameters, Job, JobError, JobOutput, JobStatus, new_job_id
from jobs.store import JobStore, job_key


def _job() -> Job:
    return Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=3))


def test_create_then_get(redis_client):
    store = JobStore(redis_client, retention_seconds=100)
    job = _job()
    store.create(job)
    assert store.get(job.id) == job
    assert 0 < redis_client.ttl(job_key(job.id)) <= 100


def test_unknown_job_is_none(redis_client):
    assert JobStore(redis_client, 100).get(new_job_id()) is None


def test_start_records_worker_attempts_and_queue_time(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    started = store.start(job.id, "w1")
    assert started.status is JobStatus.RUNNING
    assert started.worker == "w1" and started.attempts == 1
    assert started.metrics.queue_seconds is not None
    again = store.start(job.id, "w2")  # a redelivery after w1 died
    assert again.worker == "w2" and again.attempts == 2
    assert again.metrics.queue_seconds == started.metrics.queue_seconds


def test_a_job_accepts_exactly_one_final_result(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "w1")
    first = JobOutput(generated_text="one", generated_tokens=3, finish_reason="length")
    assert store.succeed(job.id, first, 0.3) is not None
    late = JobOutput(generated_text="two", generated_tokens=3, finish_reason="length")
    assert store.succeed(job.id, late, 0.1) is None
    assert store.fail(job.id, JobError(type="x", message="y")) is None
    assert store.start(job.id, "w2") is None  # a redelivered message does not run a finished job
    final = store.get(job.id)
    assert final.status is JobStatus.SUCCEEDED
    assert final.output.generated_text == "one"
    assert final.metrics.seconds_per_token == 0.1


def test_finishing_renews_retention(redis_client):
    store = JobStore(redis_client, 1000)
    job = _job()
    store.create(job)
    redis_client.expire(job_key(job.id), 5)
    store.start(job.id, "w")
    store.fail(job.id, JobError(type="internal_error", message="boom"))
    assert redis_client.ttl(job_key(job.id)) > 900
