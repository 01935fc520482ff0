"""The job runner around the engine, with a fake engine and a real Redis store."""

import threading

from jobs.schema import FinishReason, GenerateParameters, Job, JobOutput, JobStatus, new_job_id
from jobs.store import JobStore
from worker.engine import GenerationResult, RequestValidationError
from worker.tasks import JobRunner


class FakeSeq:
    def __init__(self):
        self.done = threading.Event()
        self.tokens = []
        self.text = ""
        self.error = None
        self.sampling = type("S", (), {"seed": None})()


class FakeEngine:
    """Finishes each request at once with a fixed outcome (a result, or an exception)."""

    def __init__(self, outcome, submit_error=None):
        self.outcome = outcome
        self.submit_error = submit_error
        self.calls = 0

    def submit(self, prompt, params, timeout=None):
        self.calls += 1
        if self.submit_error:
            raise self.submit_error
        seq = FakeSeq()
        if isinstance(self.outcome, GenerationResult):
            seq.text = self.outcome.output.generated_text
        seq.done.set()
        return seq

    def partial_text(self, seq):
        return seq.text

    def result(self, seq):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self, seq):
        pass


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
