"""Rotating the REST API's token (docs/architecture.md, "Token rotation"): a controller takes
a comma-separated list of tokens and accepts each, the CLI sends the first, and the status
page's cookie lives as long as the token it signed in with is listed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from broker_serve.cli.rest_client import ApiError, RestClient
from broker_serve.controller import status_page
from broker_serve.controller.api_token import (
    bearer_matches,
    client_token,
    server_tokens,
    split_tokens,
    token_bytes,
)
from broker_serve.settings import Settings

from .conftest import Cluster, free_port
from .waiting import wait_for

OLD, NEW = "old-token-0123456789", "new-token-9876543210"
APPLICATIONS = "/api/serve/applications/"


def test_a_token_list_is_split_and_any_listed_token_matches(monkeypatch, tmp_path):
    assert split_tokens(f" {NEW} , {OLD},, ") == [NEW, OLD]
    assert split_tokens(None) == [] and split_tokens(" , ") == []
    tokens = token_bytes(f"{NEW},{OLD}")
    assert bearer_matches(f"Bearer {OLD}", tokens) and bearer_matches(f"bearer {NEW} ", tokens)
    # A client sending the whole list (KEDA, reading the controllers' Secret) presents its first.
    assert bearer_matches(f"Bearer {NEW},{OLD}", tokens)
    assert not bearer_matches(f"Bearer neither,{NEW}", tokens)
    assert not bearer_matches("Bearer ", tokens) and not bearer_matches(OLD, tokens)
    with pytest.raises(ValueError):
        token_bytes(" , ")
    monkeypatch.setenv("BROKER_SERVE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", f"{NEW}, {OLD}")
    assert server_tokens("c") == [NEW, OLD]
    assert client_token("c") == NEW  # a client sends the first
    assert client_token("c", f"{OLD},{NEW}") == OLD  # --token wins, and its first is sent
    monkeypatch.delenv("BROKER_SERVE_API_TOKEN")
    [generated] = server_tokens("c")  # no variable: the token file, as before
    assert client_token("c") == generated and server_tokens("c") == [generated]


@contextmanager
def controller(cluster: Cluster, log_path: Path, tokens: str) -> Iterator[str]:
    """A `broker-serve controller` taking `tokens`; yields its REST API's address once it
    serves."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker_serve", "controller"],
            env={**cluster.env, "BROKER_SERVE_DASHBOARD_PORT": str(port),
                 "BROKER_SERVE_API_TOKEN": tokens},
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: _serving(address), timeout=30)
            yield address
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(5)


def _serving(address: str) -> bool:
    try:
        return requests.get(address + "/metrics", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _status(address: str, token: str) -> int:
    return requests.get(address + APPLICATIONS, timeout=10,
                        headers={"Authorization": f"Bearer {token}"}).status_code


def _signed_in_cookie(address: str, token: str) -> dict[str, str]:
    answer = requests.post(address + "/login", data={"token": token}, allow_redirects=False,
                           timeout=10)
    assert answer.status_code == 303, answer.text
    return dict(answer.cookies)


def _page_data(address: str, cookies: dict[str, str]) -> int:
    return requests.get(address + status_page.OVERVIEW_PATH, cookies=cookies,
                        timeout=10).status_code


def test_a_token_is_rotated_without_downtime(cluster, monkeypatch, tmp_path):
    log_path = tmp_path / "controller.log"
    # Step 1: the controller takes the new token beside the old one.
    with controller(cluster, log_path, f"{NEW},{OLD}") as address:
        assert _status(address, OLD) == 200 and _status(address, NEW) == 200
        assert _status(address, "neither") == 401
        old_cookie, new_cookie = (_signed_in_cookie(address, OLD),
                                  _signed_in_cookie(address, NEW))
        assert old_cookie != new_cookie
        assert _page_data(address, old_cookie) == 200 and _page_data(address, new_cookie) == 200
        # Step 2: clients move to the new token; one still holding the list sends its first.
        monkeypatch.setenv("BROKER_SERVE_API_TOKEN", f"{NEW},{OLD}")
        assert RestClient(Settings(), address, None).token == NEW
        assert "applications" in RestClient(Settings(), address, None).request(
            "GET", APPLICATIONS)
        cli = subprocess.run(
            [sys.executable, "-m", "broker_serve", "status", "--address", address,
             "--token", f"{OLD},{NEW}"], env=cluster.env, capture_output=True, text=True,
            timeout=60)
        assert cli.returncode == 0, cli.stdout + cli.stderr
    # Step 3: the old token is dropped from the list; it is refused, its cookie too.
    with controller(cluster, log_path, NEW) as address:
        assert _status(address, NEW) == 200 and _status(address, OLD) == 401
        assert _page_data(address, new_cookie) == 200 and _page_data(address, old_cookie) == 401
        refused = requests.post(address + "/login", data={"token": OLD}, allow_redirects=False,
                                timeout=10)
        assert refused.status_code == 401
        with pytest.raises(ApiError, match="refused the token"):
            RestClient(Settings(), address, OLD).request("GET", APPLICATIONS)
