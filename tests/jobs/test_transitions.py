"""A job's state transitions as pure functions: no Redis, the time passed in."""

from datetime import timedelta

from jobs.schema import GenerateParameters, Job, JobError, JobMetrics, JobOutput, JobStatus, new_job_id, utcnow
from jobs.transitions import (
    EXPIRED,
    POISON_AFTER,
    CancelOutcome,
    canceled,
    device_faulted,
    expired,
    finished,
    model_metrics,
    orphan_requeued,
    started,
    stuck_failed,
)

NOW = utcnow()
OUTPUT = JobOutput(generated_text="hi there", generated_tokens=4, finish_reason="length")


def _job(**fields) -> Job:
    return Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=3), **fields)


def _running(attempt: int = 1, instance: str = "w1#1", **fields) -> Job:
    return _job(status=JobStatus.RUNNING, attempts=attempt, worker="w1", worker_instance=instance, **fields)


def test_start_makes_the_next_attempt_and_times_the_first_wait():
    job = _job(created_at=NOW - timedelta(seconds=2.5))
    first = started(job, "w1", "w1#1", owner_alive=False, now=NOW)
    assert first.status is JobStatus.RUNNING and first.attempts == 1 and first.started_at == NOW
    assert (first.worker, first.worker_instance) == ("w1", "w1#1")
    assert first.metrics.queue_seconds == 2.5
    # A takeover after the first owner died: the queue time stays the first wait's.
    second = started(first, "w2", "w2#9", owner_alive=False, now=NOW + timedelta(seconds=60))
    assert second.attempts == 2 and second.worker_instance == "w2#9" and second.metrics.queue_seconds == 2.5


def test_start_refuses_a_live_owners_job_and_a_final_one():
    assert started(_running(), "w2", "w2#1", owner_alive=True, now=NOW) is None
    assert started(_job(status=JobStatus.SUCCEEDED), "w1", "w1#1", owner_alive=False, now=NOW) is None


def test_start_past_the_deadline_fails_the_job_as_expired():
    job = _job(deadline=NOW - timedelta(seconds=1))
    after = started(job, "w1", "w1#1", owner_alive=False, now=NOW)
    assert after.status is JobStatus.FAILED and after.error == EXPIRED and after.attempts == 0
    assert after.finished_at == NOW


def test_expired_only_applies_to_a_queued_job_at_its_deadline():
    assert expired(_job(deadline=NOW), NOW).error.type == "expired"
    assert expired(_job(deadline=NOW + timedelta(seconds=1)), NOW) is None
    assert expired(_job(), NOW) is None  # no deadline
    assert expired(_running(deadline=NOW - timedelta(hours=1)), NOW) is None


def test_finish_records_the_result_and_merges_metrics():
    job = _running(metrics=JobMetrics(queue_seconds=0.5))
    done = finished(job, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics=model_metrics(OUTPUT, 2.0), attempt=1)
    assert done.status is JobStatus.SUCCEEDED and done.output == OUTPUT and done.finished_at == NOW
    assert done.metrics.queue_seconds == 0.5  # kept
    assert (done.metrics.inference_seconds, done.metrics.seconds_per_token) == (2.0, 0.5)


def test_finish_refuses_a_second_result_and_a_stale_attempts_result():
    final = _job(status=JobStatus.FAILED)
    assert finished(final, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics={}) is None
    requeued_then_restarted = _running(attempt=2)
    assert finished(requeued_then_restarted, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics={}, attempt=1) is None
    requeued = _job(attempts=1)  # queued again: attempt 1 no longer runs it
    assert finished(requeued, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics={}, attempt=1) is None
    # Without an attempt (a failure the web records), a queued job can still end.
    error = JobError(type="internal_error", message="boom")
    assert finished(requeued, JobStatus.FAILED, NOW, error=error, metrics={}).error == error


def test_cancel_ends_a_queued_job_asks_a_running_one_and_leaves_a_final_one():
    job, outcome = canceled(_job(), NOW)
    assert outcome == CancelOutcome.CANCELED and job.status is JobStatus.CANCELED and job.finished_at == NOW
    job, outcome = canceled(_running(), NOW)
    assert outcome == CancelOutcome.REQUESTED and job.status is JobStatus.RUNNING and job.cancel_requested
    assert canceled(_job(status=JobStatus.SUCCEEDED), NOW) == (None, CancelOutcome.ALREADY_FINAL)


def test_a_device_fault_requeues_the_job_until_it_is_a_poison_job():
    once = device_faulted(_running(attempt=1), 1, "CUDA error", blamed=True, now=NOW)
    assert once.status is JobStatus.QUEUED and once.device_faults == 1
    assert once.worker is None and once.worker_instance is None
    again = device_faulted(_running(attempt=2, device_faults=once.device_faults), 2, "CUDA error", blamed=True, now=NOW)
    assert POISON_AFTER == 2
    assert again.status is JobStatus.FAILED and again.error.type == "poison_job" and again.device_faults == 2
    assert "CUDA error" in again.error.message and again.finished_at == NOW


def test_a_device_fault_not_blamed_does_not_count_and_a_stale_attempt_changes_nothing():
    bystander = device_faulted(_running(attempt=1, device_faults=1), 1, "CUDA error", blamed=False, now=NOW)
    assert bystander.status is JobStatus.QUEUED and bystander.device_faults == 1
    assert device_faulted(_running(attempt=3), 2, "CUDA error", blamed=True, now=NOW) is None
    assert device_faulted(_job(attempts=1), 1, "CUDA error", blamed=True, now=NOW) is None


def test_an_orphan_is_requeued_only_when_its_instance_is_gone():
    orphan = orphan_requeued(_running(attempt=3, instance="dead#1"), {"w1#1"})
    assert orphan.status is JobStatus.QUEUED and orphan.worker_instance is None and orphan.attempts == 3
    assert orphan_requeued(_running(instance="w1#1"), {"w1#1"}) is None
    assert orphan_requeued(_job(), set()) is None


def test_a_running_job_fails_as_stuck_only_past_its_deadline_and_the_grace():
    job = _running(deadline=NOW - timedelta(seconds=30))
    assert stuck_failed(job, grace_seconds=60, now=NOW) is None
    stuck = stuck_failed(job, grace_seconds=20, now=NOW)
    assert stuck.status is JobStatus.FAILED and stuck.error.type == "timeout" and stuck.finished_at == NOW
    assert stuck_failed(_running(), grace_seconds=0, now=NOW) is None  # no deadline


def test_model_metrics_per_token_needs_tokens_and_a_time():
    assert model_metrics(OUTPUT, 1.0) == {"inference_seconds": 1.0, "seconds_per_token": 0.25}
    assert model_metrics(None, 1.0) == {"inference_seconds": 1.0, "seconds_per_token": None}
    assert model_metrics(OUTPUT, None) == {"inference_seconds": None, "seconds_per_token": None}


def test_the_time_to_first_token_counts_from_submission():
    created = NOW - timedelta(seconds=3)
    job = _running(created_at=created, started_at=created + timedelta(seconds=1.25))
    done = finished(job, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics=model_metrics(OUTPUT, 1.5, 0.25), attempt=1)
    assert done.metrics.time_to_first_token == 1.5  # 1.25 s waiting, then 0.25 s to its first token
    without = finished(job, JobStatus.SUCCEEDED, NOW, output=OUTPUT, metrics=model_metrics(OUTPUT, 1.5), attempt=1)
    assert without.metrics.time_to_first_token is None and "first_token_seconds" not in without.metrics.model_dump()
