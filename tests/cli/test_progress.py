"""The command-line client's progress bar (a fake client: the end-to-end test drives the real one)."""

from __future__ import annotations

import io

import cli


class _Jobs:
    """Answers polls with the given job states in turn."""

    def __init__(self, *states: dict) -> None:
        self.states = list(states)

    def get(self, job_id: str, wait: int = 0) -> dict:
        return self.states.pop(0)


def _job(status: str, tokens: int | None) -> dict:
    output = None if tokens is None else {"generated_tokens": tokens}
    return {"id": "j", "status": status, "parameters": {"max_new_tokens": 50}, "output": output}


def test_a_job_that_ends_early_leaves_the_bar_full_with_its_last_figures(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", err)
    final = cli._wait_with_progress(_Jobs(_job("running", 2), _job("succeeded", 3)), _job("queued", None))
    assert final["status"] == "succeeded"
    assert "succeeded: 100%" in err.getvalue() and "3/3" in err.getvalue()  # not 3/50, nor a stale 2/50
