"""The dead-letter workflow (docs/protocol.md, "Dead letters"): list, show, replay and purge
through the controller's REST API and `broker-serve dead`, on real RabbitMQ and Redis, with
dead letters published as a failed job's last replica and RabbitMQ itself would."""

from __future__ import annotations

import datetime
import secrets
import subprocess
import sys
from typing import Any

import msgpack
import pika
import pytest
import redis
import requests
import yaml

from broker_serve import serve
from broker_serve.transport.dead_letters import _replay_headers

from .conftest import AMQP_URL, REDIS_URL, ROOT
from .waiting import wait_for

APP = "my.app"  # app names may hold dots: the app records, not the queue name, say where


@serve.deployment
class Adder:
    async def __call__(self, a: int, b: int) -> int:
        return a + b


def _publish_dead(cluster_name: str, letters: list[tuple[str, dict[str, Any], bytes, Any]]
                  ) -> None:
    """Publish (id, headers, body, reply_to) messages straight to the dead-letter queue."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for letter_id, headers, body, reply_to in letters:
            channel.basic_publish("", f"bs.{cluster_name}.dead", body, pika.BasicProperties(
                type="call", content_type="application/msgpack", message_id=letter_id,
                correlation_id=letter_id, delivery_mode=2, priority=3, headers=headers,
                reply_to=reply_to), mandatory=True)
    finally:
        connection.close()


def _failed_job(queue: str, reason: str = "retries-exhausted") -> dict[str, Any]:
    return {"bs-version": 1, "bs-job": 3600, "bs-max-retries": 3, "bs-dead-queue": queue,
            "bs-dead-reason": reason, "bs-dead-error": "ValueError",
            "bs-dead-message": "no luck", "bs-dead-at": 1_700_000_000_000, "bs-attempt": 4}


def _call_body(a: int, b: int) -> bytes:
    return msgpack.packb({"method": "__call__", "args": [a, b], "kwargs": {}})


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_list_show_purge_and_replay_through_the_rest_api_and_the_cli(cluster, monkeypatch,
                                                                    queue_type):
    token = secrets.token_urlsafe(16)
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", token)
    monkeypatch.setenv("BROKER_SERVE_QUEUE_TYPE", queue_type)  # quorum: durable mode
    serve.run(Adder.bind(), name=APP, route_prefix="/add")
    queue = f"bs.{cluster.name}.{APP}.Adder"
    api = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}/api/serve/dead"
    auth = {"Authorization": f"Bearer {token}"}

    def rest_api_up() -> bool:
        try:
            return requests.get(api, headers=auth, timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(rest_api_up)
    job, twice, dropped, orphan, expired = (secrets.token_hex(16) for _ in range(5))
    gone = f"bs.{cluster.name}.gone.Old"  # an app deleted since: its queue is gone
    rabbit_death = {"bs-version": 1, "x-death": [{
        "queue": queue, "reason": "expired", "count": 1, "exchange": "",
        "routing-keys": [queue], "time": datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)}],
        "x-first-death-queue": queue, "x-first-death-reason": "expired"}
    _publish_dead(cluster.name, [
        (job, _failed_job(queue), _call_body(1, 2), None),
        (dropped, _failed_job(queue, "not-retryable"), _call_body(5, 5), None),
        (orphan, _failed_job(gone), _call_body(0, 0), None),
        (expired, rabbit_death, _call_body(7, 8), f"bs.{cluster.name}.reply.gone"),
        (job, _failed_job(queue), _call_body(1, 2), None),  # a job dead-lettered twice
        (twice, _failed_job(queue), _call_body(b"x" * 1000, 1), None),
    ])
    store = redis.Redis.from_url(REDIS_URL)
    record_key = f"bs:{cluster.name}:job:{job}"
    store.hset(record_key, mapping={"status": "FAILED", "app": APP, "deployment": "Adder",
                                    "kind": "call", "attempts": "4", "ttl_s": "3600",
                                    "error": "ValueError", "message": "no luck"})
    store.expire(record_key, 3600)

    def listed(**query: Any) -> list[dict[str, Any]]:
        answer = requests.get(api, headers=auth, params=query, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["count"] == len(answer.json()["dead_letters"])
        return answer.json()["dead_letters"]

    everything = listed()
    assert [letter["id"] for letter in everything] == [job, dropped, orphan, expired, job, twice]
    first = everything[0]
    assert first == {"id": job, "queue": queue, "app": APP, "deployment": "Adder",
                     "reason": "retries-exhausted", "error": "ValueError",
                     "message": "no luck", "dead_at": 1_700_000_000.0, "kind": "call",
                     "attempts": 4, "priority": 3, "size": len(_call_body(1, 2)),
                     "is_job": True}
    by_rabbit = everything[3]
    assert by_rabbit["queue"] == queue and by_rabbit["app"] == APP
    assert by_rabbit["reason"] == "expired" and by_rabbit["is_job"] is False
    assert by_rabbit["dead_at"] == datetime.datetime(2026, 1, 2,
                                                     tzinfo=datetime.UTC).timestamp()
    assert everything[2]["app"] == "gone" and everything[2]["deployment"] == "Old"
    # Reading kept every message, in its place.
    assert [letter["id"] for letter in listed()] == [letter["id"] for letter in everything]
    assert [letter["id"] for letter in listed(app="gone")] == [orphan]
    assert len(listed(app=APP, deployment="Adder")) == 5
    assert listed(app=APP, deployment="Nope") == []

    shown = requests.get(f"{api}/{twice}", headers=auth, timeout=30)
    assert shown.status_code == 200, shown.text
    assert shown.json()["id"] == twice and shown.json()["kind"] == "call"
    args = shown.json()["body"]["args"]
    assert args[1] == 1 and args[0].startswith("b'xxx") and args[0].endswith("(1000 bytes)")
    assert requests.get(f"{api}/nope", headers=auth, timeout=30).status_code == 404

    # Without the token nothing is read or changed; an empty selector changes nothing.
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert requests.get(api, headers=headers, timeout=30).status_code == 401
        assert requests.post(f"{api}/purge", headers=headers, json={"all": True},
                             timeout=30).status_code == 401
    for selector in ({}, {"ids": []}, {"all": False}, {"all": True, "app": APP}):
        for action in ("replay", "purge"):
            refused = requests.post(f"{api}/{action}", headers=auth, json=selector, timeout=30)
            assert refused.status_code == 400, (action, selector, refused.text)
    assert len(listed()) == 6

    purged = requests.post(f"{api}/purge", headers=auth, json={"ids": [dropped]}, timeout=30)
    assert purged.status_code == 200 and purged.json() == {"purged": 1}
    assert [letter["id"] for letter in listed()] == [job, orphan, expired, job, twice]

    # Both copies of the job go; it runs once more, under its own id.
    replayed = requests.post(f"{api}/replay", headers=auth, json={"ids": [job]}, timeout=30)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == {"replayed": 1, "ids": [job], "kept": {}}

    def succeeded() -> dict[bytes, bytes] | None:
        record = store.hgetall(record_key)
        return record if record.get(b"status") == b"SUCCEEDED" else None

    record = wait_for(succeeded, timeout=30)
    assert record[b"replays"] == b"1" and record[b"attempts"] == b"1"
    assert msgpack.unpackb(record[b"result"]) == [["result", {"value": 3, "more": False}]]
    assert [letter["id"] for letter in listed()] == [orphan, expired, twice]

    # A dead letter whose queue is gone stays, and the answer says why.
    kept = requests.post(f"{api}/replay", headers=auth, json={"app": "gone"}, timeout=30)
    assert kept.status_code == 200
    assert kept.json()["replayed"] == 0 and gone in kept.json()["kept"][orphan]
    assert [letter["id"] for letter in listed()] == [orphan, expired, twice]
    assert store.exists(f"bs:{cluster.name}:job:{orphan}") == 0  # its record was left alone

    # The CLI, as a user runs it.
    env = {**cluster.env, "BROKER_SERVE_API_TOKEN": token}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "broker_serve", "dead", *args], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    table = cli("list", "--app", APP)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "APP", "DEPLOYMENT", "REASON"]
    assert [line.split()[0] for line in lines[1:]] == [expired, twice]
    assert "expired" in lines[1] and "2026-01-02 00:00:00" in lines[1]
    # A call reads no more than its limit. A quorum queue puts the messages read behind the
    # others, a classic one back in their places.
    assert [letter["id"] for letter in listed(limit=2)] == [orphan, expired]
    assert [letter["id"] for letter in listed()] == (
        [orphan, expired, twice] if queue_type == "classic" else [twice, orphan, expired])
    refused = cli("replay")
    assert refused.returncode == 1 and "name the dead letters" in refused.stderr
    shown_cli = cli("show", twice)
    assert shown_cli.returncode == 0, shown_cli.stderr
    assert yaml.safe_load(shown_cli.stdout)["id"] == twice
    assert cli("list", "--app", APP, "--deployment", "Nope").stdout.strip() == "No dead letters."
    kept_cli = cli("replay", "--app", "gone")
    assert kept_cli.returncode == 1 and kept_cli.stdout.strip() == "Replayed 0 dead letter(s)."
    assert f"Kept {orphan}:" in kept_cli.stderr and gone in kept_cli.stderr
    no_token = subprocess.run([sys.executable, "-m", "broker_serve", "dead", "list"],
                              env={**env, "BROKER_SERVE_API_TOKEN": "wrong"}, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert no_token.returncode == 1 and "refused the token" in no_token.stderr
    assert cli("purge", "--all").stdout.strip() == "Purged 3 dead letter(s)."
    assert cli("list").stdout.strip() == "No dead letters."


@pytest.mark.parametrize(("headers", "kept"), [
    ({"bs-version": 1, "bs-job": 60, "bs-dead-reason": "deadline", "bs-dead-at": 1,
      "bs-attempt": 2}, {"bs-version": 1, "bs-job": 60}),
    ({"bs-version": 1, "x-death": [], "x-first-death-queue": "q", "x-last-death-reason": "r",
      "x-delivery-count": 3, "bs-deadline": 5}, {"bs-version": 1, "bs-deadline": 5}),
])
def test_a_replay_leaves_off_what_dead_lettering_added(headers, kept):
    assert _replay_headers(headers) == kept
