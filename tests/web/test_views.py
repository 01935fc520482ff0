"""The HTML form and job page (server side; the browser behaviour is covered end to end)."""

from tests.support import csrf_token
from web.pages.views import story_prompt


def post_form(client, data, path="/"):
    """Submit a form as a browser would: with the token from the page."""
    token = csrf_token(client.get("/").get_data(as_text=True))
    return client.post(path, data={**data, "csrf_token": token})


def test_form_lists_models_and_parameters(client):
    page = client.get("/").get_data(as_text=True)
    assert 'name="inputs"' in page and 'name="max_new_tokens"' in page
    assert "tiny-bloom" in page and "Creative story" in page


def test_form_submission_redirects_to_the_job_page(client):
    response = post_form(client, {"inputs": "Hello there", "max_new_tokens": "8", "temperature": "0"})
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["inputs"] == "Hello there"
    assert job["parameters"]["max_new_tokens"] == 8
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert job_id in page and "queued" in page and 'dir="auto"' in page


def test_story_preset_builds_the_prompt_from_the_title(client):
    response = post_form(client, {"preset": "story", "title": "a dragon who bakes", "inputs": "ignored"})
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["inputs"] == "This is a creative story about a dragon who bakes.\n"
    assert story_prompt(" x ") == "This is a creative story about x.\n"


def test_invalid_form_shows_messages_next_to_the_fields(client, redis_client):
    response = post_form(client, {"inputs": "hi", "top_p": "5", "seed": "abc"})
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert 'data-field="parameters.seed"' in page and "whole number" in page
    assert ">hi</textarea>" in page  # the prompt keeps what was typed
    response = post_form(client, {"inputs": "hi", "top_p": "5"})
    assert 'data-field="parameters.top_p"' in response.get_data(as_text=True)
    assert redis_client.keys("bloomq:job:*") == []


def test_story_without_title_is_refused(client):
    response = post_form(client, {"preset": "story", "title": "  "})
    assert response.status_code == 422
    assert 'data-field="title"' in response.get_data(as_text=True)


def test_unknown_job_page_is_an_html_404(client):
    response = client.get("/jobs/00000000-0000-4000-8000-000000000000")
    assert response.status_code == 404
    assert "text/html" in response.content_type


def test_a_form_post_without_the_csrf_token_is_refused(client, redis_client):
    response = client.post("/", data={"inputs": "Hello"})
    assert response.status_code == 400 and "CSRF" in response.get_data(as_text=True)
    assert redis_client.keys("bloomq:job:*") == []


def test_the_pages_say_when_auth_is_off(client):
    assert "API keys are off" in client.get("/").get_data(as_text=True)


def test_a_plain_text_file_of_prompts_becomes_a_batch_with_a_page(client, redis_client):
    import io

    page = client.get("/batches")
    assert page.status_code == 200 and b"Your batches" in page.data
    token = csrf_token(page.get_data(as_text=True))
    data = {"kind": "prompts", "max_new_tokens": "5", "temperature": "0", "csrf_token": token,
            "file": (io.BytesIO("first prompt\n\nsecond prompt\n".encode()), "prompts.txt")}
    response = client.post("/batches", data=data, content_type="multipart/form-data")
    assert response.status_code == 303
    batch_page = client.get(response.headers["Location"])
    assert batch_page.status_code == 200 and b"of 2" in batch_page.data  # two prompts, the blank line skipped
    assert redis_client.llen("bloomq:batch-queue:tiny-bloom:-") == 2
    empty = client.post("/batches", data={"kind": "prompts", "csrf_token": token, "file": (io.BytesIO(b""), "x.txt")},
                        content_type="multipart/form-data")
    assert empty.status_code == 422 and b"at least one line" in empty.data


def test_a_batch_file_larger_than_an_ordinary_body_is_taken_by_the_form_and_the_api(redis_server, redis_client):
    """Both upload routes take files up to BLOOMQ_MAX_BATCH_FILE_BYTES, though other bodies stop at
    BLOOMQ_MAX_BODY_BYTES; the form's CSRF check reads the body first, so the limit is raised before it."""
    import io

    from config.settings import Settings
    from web import create_app

    app = create_app(Settings(redis_url=redis_server.url, model="/models/tiny-bloom", max_body_bytes=4096,
                              max_batch_file_bytes=256 * 1024))
    client = app.test_client()
    prompts = "".join(f"prompt number {i} of a long file\n" for i in range(1000)).encode()  # ~32 kB
    assert 4096 < len(prompts) < 256 * 1024
    token = csrf_token(client.get("/batches").get_data(as_text=True))
    data = {"kind": "prompts", "max_new_tokens": "5", "csrf_token": token, "file": (io.BytesIO(prompts), "p.txt")}
    response = client.post("/batches", data=data, content_type="multipart/form-data")
    assert response.status_code == 303, response.get_data(as_text=True)[:300]
    assert redis_client.llen("bloomq:batch-queue:tiny-bloom:-") == 1000
    line = b'{"custom_id": "c%d", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello"}}\n'
    jsonl = b"".join(line % i for i in range(300))
    assert 4096 < len(jsonl) < 256 * 1024
    upload = client.post("/v1/files", data={"purpose": "batch", "file": (io.BytesIO(jsonl), "b.jsonl")},
                         content_type="multipart/form-data")
    assert upload.status_code == 200, upload.get_json()
    # Other routes keep the ordinary limit.
    big = client.post("/api/v1/jobs", json={"inputs": "x" * 8192})
    assert big.status_code == 413
