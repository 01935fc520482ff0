"""``GET /api/v1/dashboard``: the live dashboard's figures (operators; the page polls it)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from web.http.auth import authenticate_api, require_operator
from web.services.dashboard import Dashboard

DASHBOARD_PATH = "/api/v1/dashboard"

dashboard_api = Blueprint("dashboard", __name__)
dashboard_api.before_request(authenticate_api)


def current_dashboard() -> Dashboard:
    return current_app.extensions["bloomq.dashboard"]


@dashboard_api.get(DASHBOARD_PATH)
def dashboard_figures() -> Response:
    """Per model: queues (interactive, batch), rows in use and capacity, tokens per second, queue wait and
    time to first token p50/p95 and failures by reason over 5 minutes, per-minute series over 15; per worker: where it runs,
    rows, KV blocks, prefills, memory, last heartbeat."""
    require_operator()
    return jsonify(current_dashboard().figures())
