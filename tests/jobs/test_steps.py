"""What a change causes, staged step by step on a pipeline that only records the commands (no Redis)."""

import json
from typing import Any

from jobs.keys import DEADLINES_KEY, RUNNING_KEY, batch_key, job_events_channel, job_key, job_stream_key, queued_key
from jobs.outbox import DUE_KEY
from jobs.schema import GenerateParameters, Job, JobOutput, JobStatus, new_job_id, utcnow
from jobs.steps import Change, stage_change


class RecordingPipe:
    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self.commands.append((name, args, kwargs))

    def on(self, key: str) -> list[str]:
        return [name for name, args, _ in self.commands if args and args[0] == key]


def _job(**fields) -> Job:
    return Job(id=new_job_id(), model="tiny", inputs="hi", parameters=GenerateParameters(max_new_tokens=3), **fields)


def test_a_batch_line_finishing_counts_once_and_ends_its_stream_after_the_status_event():
    before = _job(status=JobStatus.RUNNING, attempts=1, batch_id="b1", deadline=utcnow())
    output = JobOutput(generated_text="x", generated_tokens=1, finish_reason="length")
    after = before.model_copy(update={"status": JobStatus.SUCCEEDED, "finished_at": utcnow(), "output": output})
    pipe = RecordingPipe()
    stage_change(pipe, Change(before, after, retention_seconds=100))
    assert pipe.on(job_key(after.id)) == ["hset", "expire", "hdel"]  # the partial output goes
    assert pipe.on(RUNNING_KEY) == ["srem"]
    events = [json.loads(args[1]["data"]) for name, args, _ in pipe.commands if name == "xadd"]
    assert [e.get("status") for e in events] == ["succeeded", "succeeded"]  # the status event, then done
    assert "output" in events[1]
    assert [(args[1], args[2]) for name, args, _ in pipe.commands if args[0] == batch_key("b1")] == [("completed", 1)]
    assert pipe.on(DEADLINES_KEY) == ["zrem"]
    assert pipe.on(job_stream_key(after.id)) == ["xadd", "expire", "xadd", "expire"]
    assert pipe.commands[-1][:2] == ("publish", (job_events_channel(after.id), "succeeded"))


def test_a_requeued_interactive_job_reenters_the_queued_index_with_its_score_and_no_webhook():
    before = _job(status=JobStatus.RUNNING, attempts=1, webhook="https://example.com/hook",
                  webhook_events=["completed"])
    after = before.model_copy(update={"status": JobStatus.QUEUED, "worker": None, "worker_instance": None})
    pipe = RecordingPipe()
    stage_change(pipe, Change(before, after, retention_seconds=100, queued_score=-1.0))
    assert ("zadd", (queued_key("tiny"), {after.id: -1.0}), {}) in pipe.commands
    assert pipe.on(DUE_KEY) == [] and pipe.on(DEADLINES_KEY) == []
    assert not any(name == "hincrby" for name, _, _ in pipe.commands)  # nothing counted: it is not final
