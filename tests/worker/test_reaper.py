"""Orphan recovery: orphaned running jobs, lost deliveries, stuck jobs (real Redis, fake clock where needed)."""

from datetime import timedelta

from jobs.keys import queued_key
from jobs.queues import BatchQueue
from jobs.schema import GenerateParameters, Job, JobStatus, new_job_id, utcnow
from jobs.store import JobStore
from jobs.workers import WorkerDirectory, WorkerInfo
from worker.liveness import process_instance
from worker.recovery import OrphanRecovery

LOST_DELIVERY_AFTER = 30
STUCK_GRACE = 120


def _job(model: str = "tiny", **extra) -> Job:
    return Job(id=new_job_id(), model=model, inputs="hi", parameters=GenerateParameters(max_new_tokens=2), **extra)


def _announce(redis_client, instance="tiny@h.cpu:1", model="tiny"):
    info = WorkerInfo(name=instance.split(":")[0], instance=instance, model=model, host="h", device="cpu",
                      dtype="float32", pid=1)
    WorkerDirectory(redis_client).announce(info, ttl_seconds=30)


class Clock:
    """A fake monotonic clock: each reaper tick reads it twice (before and after its ping)."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def _reaper(redis_client, store, sent, clock=None, instance="tiny@me.cpu:7"):
    return OrphanRecovery(store, WorkerDirectory(redis_client), lambda job: sent.append(job.id), interval=1,
                          instance=instance, trust_after=3, stuck_grace=STUCK_GRACE,
                          lost_delivery_after=LOST_DELIVERY_AFTER, clock=clock or Clock())


def _trusting_reaper(redis_client, store, sent):
    """A reaper that has been connected to Redis long enough to judge other workers."""
    reaper = _reaper(redis_client, store, sent, clock=Clock(0, 0, *[10 + i for i in range(20)]))
    reaper._reap()  # the first tick starts the trust clock and judges nobody
    return reaper


def test_a_job_whose_delivery_was_lost_is_sent_again(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    _announce(redis_client)
    sent = []
    reaper = _trusting_reaper(redis_client, store, sent)
    reaper._reap()
    assert sent == []  # queued only just now
    redis_client.zadd(queued_key("tiny"), {job.id: 0})  # as if queued long ago, its message taken by a dead worker
    redis_client.lpush("bloomq.tiny", "another job's message")
    reaper._reap()
    assert sent == []  # its queue is not empty: the message may simply be waiting there
    redis_client.delete("bloomq.tiny")
    reaper._reap()
    assert sent == [job.id]
    reaper._reap()
    assert sent == [job.id]  # not again until LOST_DELIVERY_AFTER has passed once more
    assert redis_client.zscore(queued_key("tiny"), job.id) > LOST_DELIVERY_AFTER


def test_a_job_handed_back_by_a_failing_worker_is_sent_at_once_by_one_reaper(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    started = store.start(job.id, "tiny@dead.cpu", "tiny@dead.cpu:1")
    store.record_device_fault(job.id, started.attempts, "CUDA error: an illegal memory access", blamed=False)
    _announce(redis_client)
    redis_client.lpush("bloomq.tiny", "another job's message")  # a busy queue does not hold it back
    sent_a, sent_b = [], []
    first = _trusting_reaper(redis_client, store, sent_a)
    second = _reaper(redis_client, store, sent_b, clock=Clock(0, 0, *[10 + i for i in range(20)]),
                     instance="tiny@other.cpu:8")
    first._reap()
    second._reap()
    assert sent_a + sent_b == [job.id]
    assert store.to_send_now("tiny") == []


def test_an_orphaned_running_job_is_requeued(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "tiny@dead.cpu", "tiny@dead.cpu:9")
    _announce(redis_client)
    sent = []
    _trusting_reaper(redis_client, store, sent)._reap()
    assert sent == [job.id] and store.get(job.id).status is JobStatus.QUEUED


def test_a_process_restarted_with_the_dead_ones_name_and_pid_is_a_new_instance_and_its_jobs_come_back(redis_client):
    # A container restart keeps the host name and its supervisor starts children in the same order: same name,
    # same pid. The dead process's jobs must not look like the new one's.
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    dead = process_instance("tiny@box.cpu", pid=4242)
    store.start(job.id, "tiny@box.cpu", dead)
    again = process_instance("tiny@box.cpu", pid=4242)
    assert again != dead and again.startswith("tiny@box.cpu:4242:")
    _announce(redis_client, instance=again)  # the new process is live; the dead one's heartbeat is gone
    sent = []
    reaper = _reaper(redis_client, store, sent, clock=Clock(0, 0, *[10 + i for i in range(20)]), instance=again)
    reaper._reap()
    reaper._reap()
    assert sent == [job.id] and store.get(job.id).status is JobStatus.QUEUED  # the reaper took it back
    restarted = store.start(job.id, "tiny@box.cpu", again)  # its redelivery runs here, not "already running"
    assert restarted.status is JobStatus.RUNNING and restarted.attempts == 2 and restarted.worker_instance == again


def test_a_job_running_long_past_its_deadline_on_a_live_worker_is_failed(redis_client):
    store = JobStore(redis_client, 100)
    job = _job(deadline=utcnow() + timedelta(hours=1))
    store.create(job)
    store.start(job.id, "tiny@h.cpu", "tiny@h.cpu:1")
    past = utcnow() - timedelta(seconds=STUCK_GRACE + 5)
    store._update(job.id, lambda j: j.model_copy(update={"deadline": past}))  # the clock moved on
    _announce(redis_client)
    sent = []
    _trusting_reaper(redis_client, store, sent)._reap()
    failed = store.get(job.id)
    assert sent == [] and failed.status is JobStatus.FAILED and failed.error.type == "timeout"


def test_after_connecting_it_judges_nobody_until_connected_longer_than_a_heartbeat_lifetime(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "tiny@dead.cpu", "tiny@dead.cpu:9")  # no heartbeat: looks dead
    sent = []
    reaper = _reaper(redis_client, store, sent, clock=Clock(0, 0, 2, 2, 4, 4))
    reaper._reap()
    reaper._reap()
    assert sent == []  # connected for 2 s: a live worker may not have announced itself again yet
    reaper._reap()
    assert sent == [job.id]


def test_a_slow_redis_answer_counts_as_a_break(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "tiny@dead.cpu", "tiny@dead.cpu:9")
    sent = []
    # Trusted from t=0; at t=4 a ping takes 5 s (Redis paused): every heartbeat may have lapsed meanwhile.
    reaper = _reaper(redis_client, store, sent, clock=Clock(0, 0, 4, 9, 10, 10, 13, 13))
    reaper._reap()
    reaper._reap()
    reaper._reap()
    assert sent == []
    reaper._reap()
    assert sent == [job.id]


def test_it_never_takes_its_own_processs_jobs(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    store.start(job.id, "tiny@me.cpu", "tiny@me.cpu:7")  # this process, whose own heartbeat lapsed
    sent = []
    _trusting_reaper(redis_client, store, sent)._reap()
    assert sent == [] and store.get(job.id).status is JobStatus.RUNNING


def test_of_two_reapers_that_find_the_same_lost_job_one_sends_it_again(redis_client):
    store = JobStore(redis_client, 100)
    job = _job()
    store.create(job)
    _announce(redis_client)
    redis_client.zadd(queued_key("tiny"), {job.id: 0})
    seen_early = store.stale_queued("tiny", LOST_DELIVERY_AFTER)
    assert seen_early == [job.id]

    class LateStore(JobStore):
        """The second reaper read the index before the first one acted: the read alone decides nothing."""

        def stale_queued(self, model: str, older_than: float, limit: int = 500) -> list[str]:
            return seen_early

    sent_a, sent_b = [], []
    first = _trusting_reaper(redis_client, store, sent_a)
    second = _reaper(redis_client, LateStore(redis_client, 100), sent_b,
                     clock=Clock(0, 0, *[10 + i for i in range(20)]), instance="tiny@other.cpu:8")
    second._reap()
    first._reap()
    second._reap()
    assert sent_a + sent_b == [job.id]


def test_a_big_batch_and_jobs_of_a_model_nobody_serves_do_not_hide_a_lost_job(redis_client):
    store = JobStore(redis_client, 100)
    queue = BatchQueue(redis_client)
    for _ in range(600):  # batch lines queued long ago (in their own lists, not the lost-delivery index)
        line = _job(priority_class="batch", batch_id="batch_1")
        store.create(line)
        queue.push("tiny", None, line.id)
    for _ in range(600):  # interactive jobs for a model no worker serves, older still
        orphan = _job(model="absent")
        store.create(orphan)
        redis_client.zadd(queued_key("absent"), {orphan.id: 0})
    lost = _job()
    store.create(lost)
    redis_client.zadd(queued_key("tiny"), {lost.id: 1})
    _announce(redis_client)
    sent = []
    _trusting_reaper(redis_client, store, sent)._reap()
    assert sent == [lost.id]


def test_lines_a_dead_worker_took_come_back_once_to_the_front(redis_client):
    store = JobStore(redis_client, 100)
    queue = BatchQueue(redis_client)
    lines = [_job(priority_class="batch", batch_id="batch_1") for _ in range(3)]
    for line in lines:
        store.create(line)
        queue.push("tiny", None, line.id)
    taken = [queue.take("tiny", "tiny@dead.cpu:9") for _ in range(2)]
    assert taken == [lines[0].id, lines[1].id]
    store.start(lines[1].id, "tiny@dead.cpu", "tiny@dead.cpu:9")  # one had started: it comes back as an orphan
    _announce(redis_client)
    sent = []
    first = _trusting_reaper(redis_client, store, sent)
    second = _reaper(redis_client, store, [], clock=Clock(0, 0, *[10 + i for i in range(20)]), instance="tiny@o.cpu:8")
    second._reap()
    first._reap()
    second._reap()
    assert sent == [lines[1].id]  # the started one, requeued once
    # The never-started one is back at the front, once; the third still waits behind it.
    assert [queue.take("tiny", "tiny@h.cpu:1") for _ in range(3)] == [lines[0].id, lines[2].id, None]
