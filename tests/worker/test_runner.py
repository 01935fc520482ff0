"""The job runner around the engine, with a fake engine and a real Redis store."""

import threading

from jobs.keys import job_key
from jobs.schema import FinishReason, GenerateParameters, Job, JobOutput, JobStatus, new_job_id
from jobs.store import JobStore
from tests.support import wait_for
from worker.engine.core import GenerationResult
from worker.engine.faults import DeviceFault, RequestValidationError
from worker.runner import JobRunner


class FakeSeq:
    def __init__(self):
        self.done = threading.Event()
        self.tokens = []
        self.text = ""
        self.error = None
        self.restarts = 0
        self.logprobs = []
        self.params = GenerateParameters(max_new_tokens=2)
        self.sampling = type("S", (), {"seed": None})()


class FakeEngine:
    """Finishes each request at once with a fixed outcome (a result, or an exception)."""

    def __init__(self, outcome, submit_error=None, finish=True):
        self.outcome = outcome
        self.submit_error = submit_error
        self.finish = finish
        self.calls = 0
        self.isolated = []
        self.cancelled = []
        self.fatal_error = None
        self.submitted = threading.Event()
        self.seqs = []
        self.waiting = set()  # ids of sequences given no row yet (the rest are in the batch)

    def submit(self, prompt, params, timeout=None, isolated=False, rank=(0, 0)):
        self.calls += 1
        self.isolated.append(isolated)
        if self.submit_error:
            raise self.submit_error
        seq = FakeSeq()
        if isinstance(self.outcome, GenerationResult):
            seq.text = self.outcome.output.generated_text
        if self.finish:
            seq.done.set()
        self.seqs.append(seq)
        self.submitted.set()
        return seq

    @property
    def running(self):
        return [seq for seq in self.seqs if not seq.done.is_set() and id(seq) not in self.waiting]

    def partial_text(self, seq):
        return seq.text

    def result(self, seq):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self, seq):
        self.cancelled.append(seq)
        seq.done.set()


def _queued(store: JobStore) -> Job:
    job = Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=2))
    store.create(job)
    return job


def test_success_is_stored(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    output = JobOutput(generated_text="ok", generated_tokens=2, finish_reason="length")
    JobRunner(store, FakeEngine(GenerationResult(output, 1, 0.5)), "w").run(job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.output == output
    assert done.metrics.inference_seconds == 0.5 and done.metrics.seconds_per_token == 0.25


def test_a_job_that_raises_fails_alone_with_a_clear_error(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    runner = JobRunner(store, FakeEngine(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")), "w")
    runner.run(job.id)
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED
    assert failed.error.type == "out_of_memory" and "Tried to allocate" in failed.error.message


def test_validation_failure_is_typed(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    JobRunner(store, FakeEngine(None, submit_error=RequestValidationError("inputs: too long")), "w").run(job.id)
    assert store.get(job.id).error.type == "validation_error"


def test_finished_or_unknown_jobs_are_not_run_again(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    output = JobOutput(generated_text="ok", generated_tokens=2, finish_reason="length")
    engine = FakeEngine(GenerationResult(output, 1, 0.5))
    runner = JobRunner(store, engine, "w")
    runner.run(job.id)
    runner.run(job.id)  # the same message delivered again
    runner.run(new_job_id())
    assert engine.calls == 1


def test_canceled_result_keeps_partial_text_and_timeout_fails_with_it(redis_client):
    store = JobStore(redis_client, 100)
    for reason, status, error in ((FinishReason.CANCELED, JobStatus.CANCELED, None),
                                  (FinishReason.TIMEOUT, JobStatus.FAILED, "timeout")):
        job = _queued(store)
        output = JobOutput(generated_text="part", generated_tokens=1, finish_reason=reason)
        JobRunner(store, FakeEngine(GenerationResult(output, 1, 0.1)), "w").run(job.id)
        done = store.get(job.id)
        assert done.status is status and done.output.generated_text == "part"
        assert (done.error.type if done.error else None) == error


def _run_in_background(runner, job_id, engine):
    """Run the job on a thread; return once the runner publishes its progress (the sequence is in place).
    The publisher ticks only when the test says so."""
    runner.publisher.threaded = False
    thread = threading.Thread(target=runner.run, args=(job_id,), daemon=True)
    thread.start()
    wait_for(lambda: runner.publisher.following(job_id), timeout=10, what="the runner to follow the job")
    return thread


def test_an_attempt_whose_job_was_taken_from_it_is_stopped_and_stores_nothing(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    output = JobOutput(generated_text="late", generated_tokens=2, finish_reason="length")
    engine = FakeEngine(GenerationResult(output, 1, 0.5), finish=False)
    runner = JobRunner(store, engine, "w", instance="w:1")
    thread = _run_in_background(runner, job.id, engine)
    store.requeue_if_orphaned(job.id, set())  # another worker's reaper judged this one dead
    runner.publisher.tick()  # the store's reply says the job is no longer this attempt's
    thread.join(10)
    assert not thread.is_alive() and len(engine.cancelled) == 1
    assert store.get(job.id).status is JobStatus.QUEUED  # left for its new attempt, not finished by this one


def test_a_device_fault_hands_jobs_back_and_the_second_makes_a_poison_job(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    requeued = []
    for fault in (1, 2):
        if fault == 2:
            assert store.to_send_now("tiny") == [job.id] and store.claim_send_now("tiny", job.id)
        engine = FakeEngine(None, finish=False)
        runner = JobRunner(store, engine, "w", instance=f"w:{fault}", requeue=lambda j: requeued.append(j.id))
        thread = _run_in_background(runner, job.id, engine)
        assert engine.isolated == [fault == 2]  # after one fault the job runs alone
        seq = engine.seqs[-1]
        engine.fatal_error = RuntimeError("CUDA error: device-side assert triggered")
        runner.hand_back_after_device_fault(engine.fatal_error)
        seq.done.set()  # the engine stops; the process would exit here
        thread.join(10)
        assert not thread.is_alive()
    # Handed back once (marked for a live reaper to send: nothing sent from the failing process); the second
    # time it failed.
    assert requeued == [] and store.to_send_now("tiny") == []
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error.type == "poison_job"
    assert failed.device_faults == 2 and "device-side assert" in failed.error.message


def test_a_device_fault_counts_only_against_the_jobs_in_the_failing_batch(redis_client):
    # A suspect runs alone; the jobs delivered meanwhile wait in the process. When the suspect brings the
    # device down again, only it is blamed: the waiting ones go back to the queue with no fault added.
    store = JobStore(redis_client, 100)
    suspect, waiting = _queued(store), _queued(store)
    requeued = []
    engine = FakeEngine(None, finish=False)
    runner = JobRunner(store, engine, "w", instance="w:1", requeue=lambda j: requeued.append(j.id))
    threads = [_run_in_background(runner, suspect.id, engine)]
    threads.append(_run_in_background(runner, waiting.id, engine))
    engine.waiting.add(id(engine.seqs[1]))
    engine.fatal_error = RuntimeError("CUDA error: an illegal memory access was encountered")
    runner.hand_back_after_device_fault(engine.fatal_error)
    for seq in engine.seqs:
        seq.done.set()
    for thread in threads:
        thread.join(10)
    assert requeued == [] and sorted(store.to_send_now("tiny")) == sorted([suspect.id, waiting.id])
    assert store.get(suspect.id).device_faults == 1
    back = store.get(waiting.id)
    assert back.status is JobStatus.QUEUED and back.device_faults == 0


def test_a_job_delivered_to_a_worker_stopping_after_a_device_failure_goes_back_unblamed(redis_client):
    store = JobStore(redis_client, 100)
    job = _queued(store)
    engine = FakeEngine(None, submit_error=DeviceFault("this worker's device failed and it is stopping"))
    JobRunner(store, engine, "w", instance="w:1").run(job.id)
    back = store.get(job.id)
    assert back.status is JobStatus.QUEUED and back.device_faults == 0 and back.error is None
    assert store.to_send_now("tiny") == [job.id]  # a live worker's reaper sends it at once


class WatchedStore(JobStore):
    """Records each wait for replicas, with the job's status at that moment."""

    def __init__(self, *args):
        super().__init__(*args)
        self.waits = []

    def replicated(self, job_ids, replicas, timeout_seconds):
        self.waits.append((job_ids, replicas, timeout_seconds, [self.get(j).status for j in job_ids]))
        return super().replicated(job_ids, replicas, timeout_seconds)


def test_with_min_replicas_a_final_result_is_waited_on_before_the_run_returns(redis_client):
    output = JobOutput(generated_text="ok", generated_tokens=2, finish_reason="length")
    store = WatchedStore(redis_client, 100)
    job = _queued(store)
    # No replica here: each wait times out (0.05 s); the worker asks again until its patience (0.5 s) is
    # spent, and the run returns, the result stored.
    JobRunner(store, FakeEngine(GenerationResult(output, 1, 0.5)), "w", replicas=(1, 0.05),
              replica_patience=0.5).run(job.id)
    assert len(store.waits) >= 2 and all(w == ([job.id], 1, 0.05, [JobStatus.SUCCEEDED]) for w in store.waits)
    assert store.get(job.id).status is JobStatus.SUCCEEDED

    plain = WatchedStore(redis_client, 100)
    other = _queued(plain)
    JobRunner(plain, FakeEngine(GenerationResult(output, 1, 0.5)), "w").run(other.id)
    assert plain.waits == []  # without BLOOMQ_REDIS_MIN_REPLICAS nothing waits


class FailoverStore(JobStore):
    """The first final result written is lost as in a failover (the job's record goes back to how it was
    before the write) just before a replica first answers; every later wait is answered."""

    def __init__(self, *args):
        super().__init__(*args)
        self.finals, self.before, self.lost = 0, None, False

    def succeed(self, job_id, *args, **kwargs):
        self.finals += 1
        self.before = self.before or self.redis.hgetall(job_key(job_id))
        return super().succeed(job_id, *args, **kwargs)

    def replicated(self, job_ids, replicas, timeout_seconds):
        if not self.lost:
            self.lost = True
            self.redis.delete(job_key(job_ids[0]))
            self.redis.hset(job_key(job_ids[0]), mapping=self.before)
        return True


def test_a_final_result_lost_in_a_failover_before_a_replica_had_it_is_stored_again(redis_client, caplog):
    output = JobOutput(generated_text="ok", generated_tokens=2, finish_reason="length")
    store = FailoverStore(redis_client, 100)
    job = _queued(store)
    with caplog.at_level("INFO", logger="worker.runner"):
        JobRunner(store, FakeEngine(GenerationResult(output, 1, 0.5)), "w", replicas=(1, 0.05)).run(job.id)
    done = store.get(job.id)
    assert store.lost and store.finals == 2
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 1 and done.output.generated_text == "ok"
    assert "lost in a Redis failover; stored again" in caplog.text
    assert caplog.text.count(f"job {job.id}: succeeded") == 1  # one final result, logged once


def test_a_lost_result_whose_job_was_taken_over_meanwhile_is_not_stored_again(redis_client):
    output = JobOutput(generated_text="ok", generated_tokens=2, finish_reason="length")

    class TakenOver(FailoverStore):
        def replicated(self, job_ids, replicas, timeout_seconds):
            lost = not self.lost
            super().replicated(job_ids, replicas, timeout_seconds)
            if lost:  # meanwhile a reaper judged the worker gone and requeued the job; another worker took it
                assert self.requeue_if_orphaned(job_ids[0], set()) is not None
                assert self.start(job_ids[0], "other", "other:1").attempts == 2
            return True

    store = TakenOver(redis_client, 100)
    job = _queued(store)
    JobRunner(store, FakeEngine(GenerationResult(output, 1, 0.5)), "w", replicas=(1, 0.05)).run(job.id)
    current = store.get(job.id)
    assert store.finals == 2  # tried once more, refused: attempt 1 no longer owns the job
    assert current.status is JobStatus.RUNNING and current.worker == "other"
