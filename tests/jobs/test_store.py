import json

from jobs.keys import job_key
from jobs.progress import ProgressReply, ProgressUpdate
from jobs.schema import GenerateParameters, Job, JobError, JobOutput, JobStatus, new_job_id
from jobs.store import JobStore


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


def test_a_second_delivery_to_the_process_running_a_job_does_not_start_it_again(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    assert store.start(job.id, "w1", "w1:7").attempts == 1
    assert store.start(job.id, "w1", "w1:7") is None  # the same process: it is already running there
    assert store.get(job.id).attempts == 1


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


def test_cancel_queued_running_and_final(redis_client):
    from jobs.transitions import CancelOutcome

    store = JobStore(redis_client, 100)
    queued = _job()
    store.create(queued)
    job, outcome = store.cancel(queued.id)
    assert outcome == CancelOutcome.CANCELED and job.status is JobStatus.CANCELED
    assert store.start(queued.id, "w") is None  # a canceled queued job never runs

    running = _job()
    store.create(running)
    store.start(running.id, "w")
    job, outcome = store.cancel(running.id)
    assert outcome == CancelOutcome.REQUESTED and job.status is JobStatus.RUNNING and job.cancel_requested
    again, outcome = store.cancel(running.id)
    assert outcome == CancelOutcome.REQUESTED  # idempotent
    partial = JobOutput(generated_text="half", generated_tokens=2, finish_reason="canceled")
    assert store.finish_canceled(running.id, partial, 0.2).status is JobStatus.CANCELED
    _, outcome = store.cancel(running.id)
    assert outcome == CancelOutcome.ALREADY_FINAL
    assert store.get(running.id).output.generated_text == "half"


def test_queued_job_past_its_deadline_expires(redis_client):
    from datetime import timedelta

    from jobs.schema import utcnow

    store = JobStore(redis_client, 100)
    late = _job().model_copy(update={"deadline": utcnow() - timedelta(seconds=1)})
    later = _job().model_copy(update={"deadline": utcnow() + timedelta(hours=1)})
    store.create(late)
    store.create(later)
    assert store.expire_overdue() == [late.id]
    expired = store.get(late.id)
    assert expired.status is JobStatus.FAILED and expired.error.type == "expired"
    assert store.get(later.id).status is JobStatus.QUEUED


def test_a_worker_picking_up_an_overdue_job_fails_it_instead_of_running_it(redis_client):
    from datetime import timedelta

    from jobs.schema import utcnow

    store = JobStore(redis_client, 100)
    late = _job().model_copy(update={"deadline": utcnow() - timedelta(seconds=1)})
    store.create(late)
    started = store.start(late.id, "w")
    assert started.status is JobStatus.FAILED and started.error.type == "expired"


def test_event_stream_records_status_tokens_and_done_in_order(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "w")
    store.publish_progress([ProgressUpdate(job.id, "Hel", 1, attempt=1)])
    store.publish_progress([ProgressUpdate(job.id, "lo", 2, attempt=1)])
    store.succeed(job.id, JobOutput(generated_text="Hello", generated_tokens=2, finish_reason="length"), 0.1)
    events = store.read_events(job.id, "0-0", block_ms=10)
    assert [e[1] for e in events] == ["status", "status", "token", "token", "status", "done"]
    assert json.loads(events[2][2]) == {"text": "Hel", "index": 1, "attempt": 1}
    assert json.loads(events[1][2])["attempt"] == 1  # the running status names the attempt
    assert json.loads(events[-1][2])["output"]["generated_text"] == "Hello"
    # Resuming after an event id gives exactly the events after it.
    assert store.read_events(job.id, events[2][0], block_ms=10) == events[3:]


def test_progress_shows_while_running_and_reports_cancel_requests(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "w")
    partial = JobOutput(generated_text="par", generated_tokens=1)
    assert store.publish_progress([ProgressUpdate(job.id, "par", 1, partial, attempt=1)]) == ProgressReply(set(), set())
    assert store.get(job.id).output.generated_text == "par"
    stale = JobOutput(generated_text="stale", generated_tokens=9)
    # A replaced attempt's report changes nothing, and tells that attempt it is superseded.
    assert store.publish_progress([ProgressUpdate(job.id, "", 9, stale, attempt=0)]).superseded == {job.id}
    assert store.get(job.id).output.generated_text == "par"
    store.cancel(job.id)
    assert store.publish_progress([ProgressUpdate(job.id, "t", 2, attempt=1)]) == ProgressReply({job.id}, set())
    final = JobOutput(generated_text="part", generated_tokens=2, finish_reason="canceled")
    store.finish_canceled(job.id, final, 0.1)
    late = store.publish_progress([ProgressUpdate(job.id, "", 3, partial, attempt=1)])
    assert late.superseded == {job.id}  # a late report changes nothing: the job is finished
    assert store.get(job.id).output.generated_text == "part"


def test_orphaned_running_job_is_requeued_and_the_dead_attempts_result_refused(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    first = store.start(job.id, "a", "a:1")
    assert store.running_jobs() == [job.id]
    assert store.requeue_if_orphaned(job.id, {"a:1"}) is None  # its worker is alive: leave it
    requeued = store.requeue_if_orphaned(job.id, {"b:2"})
    assert requeued.status is JobStatus.QUEUED and requeued.attempts == 1
    assert store.running_jobs() == []
    second = store.start(job.id, "b", "b:2")
    assert second.attempts == 2 and second.worker_instance == "b:2"
    late = JobOutput(generated_text="from a", generated_tokens=1, finish_reason="length")
    assert store.succeed(job.id, late, 0.1, attempt=first.attempts) is None  # stale attempt: refused
    mine = JobOutput(generated_text="from b", generated_tokens=1, finish_reason="length")
    assert store.succeed(job.id, mine, 0.1, attempt=second.attempts).output.generated_text == "from b"
    assert store.get(job.id).output.generated_text == "from b"
    assert store.running_jobs() == []


def test_a_running_job_is_taken_over_only_when_its_owner_is_dead(redis_client):
    from jobs.workers import WorkerDirectory, WorkerInfo

    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "a", "a:1")
    owner = WorkerInfo(name="a", instance="a:1", model="tiny", host="h", device="cpu", dtype="float32", pid=1)
    directory = WorkerDirectory(redis_client)
    directory.announce(owner, ttl_seconds=30)
    assert store.start(job.id, "b", "b:2") is None  # a second delivery while its owner lives: refused
    assert store.get(job.id).worker_instance == "a:1" and store.get(job.id).attempts == 1
    directory.withdraw("a:1")
    taken = store.start(job.id, "b", "b:2")
    assert taken.worker_instance == "b:2" and taken.attempts == 2


def test_an_idempotency_key_is_bound_with_the_job_in_one_transaction(redis_client):
    store = JobStore(redis_client, 100)
    first, second = _job(), _job()
    assert store.create(first, ("idem:k", '{"job_id": "%s"}' % first.id)) is None
    earlier = store.create(second, ("idem:k", '{"job_id": "%s"}' % second.id))
    assert json.loads(earlier)["job_id"] == first.id  # the key already made a job: nothing written
    assert store.get(second.id) is None and store.get(first.id) is not None


def test_a_device_fault_requeues_the_job_and_the_second_fails_it_as_poison(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    first = store.start(job.id, "a", "a:1")
    assert store.record_device_fault(job.id, first.attempts + 1, "stale attempt") is None
    requeued = store.record_device_fault(job.id, first.attempts, "CUDA error: an illegal memory access")
    assert requeued.status is JobStatus.QUEUED and requeued.device_faults == 1
    second = store.start(job.id, "b", "b:2")
    poisoned = store.record_device_fault(job.id, second.attempts, "CUDA error: device-side assert triggered")
    assert poisoned.status is JobStatus.FAILED and poisoned.error.type == "poison_job"
    assert "device-side assert" in poisoned.error.message and store.running_jobs() == []


def test_a_job_only_waiting_in_a_process_whose_device_failed_goes_back_unblamed(redis_client):
    store = JobStore(redis_client, 100)
    job = _job().model_copy(update={"device_faults": 1})  # it ran alone once already
    store.create(job)
    started = store.start(job.id, "a", "a:1")
    back = store.record_device_fault(job.id, started.attempts, "CUDA error: an illegal memory access", blamed=False)
    assert back.status is JobStatus.QUEUED and back.device_faults == 1  # not its second: it did not run
