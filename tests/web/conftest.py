import pytest

from config.settings import Settings
from web import create_app


@pytest.fixture()
def settings(redis_server, redis_client):
    return Settings(redis_url=redis_server.url, model="/models/tiny-bloom", extra_models=("bloom-1b7",))


@pytest.fixture()
def app(settings):
    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture()
def client(app):
    return app.test_client()
