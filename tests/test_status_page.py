"""The controller's status page (docs/architecture.md, "The status page"), driven in Debian's
headless chromium through Selenium and the system's chromedriver, against a running cluster:
the login form and its cookie, the page against the cluster's state, and its own refresh,
including the queue depth and ongoing requests of requests held running in a replica.

`BROKER_SERVE_TEST_SCREENSHOT=docs/status-page.png` saves the README's screenshot there (it
always goes to the test's tmp_path too).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest
import redis
import requests
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from broker_serve import serve
from broker_serve.controller import status_page
from broker_serve.protocol.names import Names
from broker_serve.settings import Settings
from broker_serve.state.store import Store

from .conftest import AMQP_URL, REDIS_URL, ROOT
from .waiting import wait_for

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Route prefixes may hold markup: the page must show it as text.
HOSTILE_PREFIX = '/x<img src=x onerror="document.title=1">'


@serve.deployment(num_replicas=2)
class Greeter:
    def __call__(self, request: Any) -> str:
        return "hello"


@serve.deployment
def echo(request: Any) -> str:
    return "echo"


@serve.deployment(max_ongoing_requests=1)
class Held:
    """Runs one request at a time, each until the test writes the file `release` in
    `directory`; each says it started in the file `started`."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    async def work(self, tag: str) -> str:
        with open(self.directory / "started", "a") as started:
            started.write(tag + "\n")
        while not (self.directory / "release").exists():
            await asyncio.sleep(0.02)
        return tag


def _started(directory: Path) -> list[str]:
    path = directory / "started"
    return path.read_text().split() if path.exists() else []


def _ready_messages(queue: str) -> int:
    """RabbitMQ's own count of the requests waiting in a queue that exists (a passive declare
    of a missing one would be a channel error)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:  # a failure, not a skip: scripts/test installs them where it may
        pytest.fail(f"missing {', '.join(missing)}: apt-get install -y chromium "
                    "chromium-driver", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _texts(driver: webdriver.Chrome, selector: str, root: WebElement | None = None
           ) -> list[str]:
    return [element.text for element in (root or driver).find_elements(By.CSS_SELECTOR,
                                                                         selector)]


def _updates(driver: webdriver.Chrome) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.updates || 0)"))


def _next_view(driver: webdriver.Chrome) -> None:
    """Wait until the page has drawn a view fetched after this call."""
    seen = _updates(driver)
    WebDriverWait(driver, 10, 0.05).until(lambda d: _updates(d) >= seen + 2)


def _sign_in(driver: webdriver.Chrome, token: str) -> None:
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()


def _page_shows(driver: webdriver.Chrome, details: dict[str, Any]) -> None:
    """The page shows every application, deployment and replica of the REST API's view."""
    apps = {card.get_attribute("data-app"): card
            for card in driver.find_elements(By.CSS_SELECTOR, ".app")}
    assert sorted(apps) == sorted(details["applications"])
    for name, app in details["applications"].items():
        card = apps[name]
        assert _texts(driver, ".app-name", card) == [name]
        assert card.find_element(By.CSS_SELECTOR, "h3 .state").text == app["status"]
        assert _texts(driver, ".route-prefix", card) == [app["route_prefix"]]
        rows = {row.get_attribute("data-deployment"): row
                for row in card.find_elements(By.CSS_SELECTOR, "tr.deployment")}
        assert sorted(rows) == sorted(app["deployments"])
        for dep_name, dep in app["deployments"].items():
            row = rows[dep_name]
            assert row.find_element(By.CSS_SELECTOR, ".deployment-status").text == dep["status"]
            running = sum(r["state"] == "RUNNING" for r in dep["replicas"])
            assert row.find_element(By.CSS_SELECTOR, ".replica-count").text == \
                f"{running}/{dep['target_num_replicas']}"
            assert row.find_element(By.CSS_SELECTOR, ".message").text == dep["message"]
            autoscaling = dep.get("autoscaling")
            assert row.find_element(By.CSS_SELECTOR, ".autoscaling").text == (
                f"→ {autoscaling['target_replicas']}: {autoscaling['last_decision']}"
                if autoscaling else "–")
            replicas = row.find_element(By.XPATH, "following-sibling::tr[1]")
            shown = {r.get_attribute("data-replica"): r.find_element(
                By.CSS_SELECTOR, ".replica-state").text
                for r in replicas.find_elements(By.CSS_SELECTOR, "tr.replica")}
            assert shown == {r["replica_id"]: r["state"] for r in dep["replicas"]}
            nodes = _texts(driver, ".replica-node", replicas)
            assert all(r["node_id"] in text for r, text in zip(dep["replicas"], nodes))


def test_the_status_page_signs_in_shows_the_cluster_and_follows_it(cluster, monkeypatch,
                                                                   browser, tmp_path):
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", token)
    serve.run(Greeter.bind(), name="shop", route_prefix="/shop")
    base = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"
    bearer = {"Authorization": f"Bearer {token}"}
    overview = base + status_page.OVERVIEW_PATH

    # The JSON needs the cookie or the token; a wrong token at the form is refused.
    assert requests.get(overview, timeout=10).status_code == 401
    assert requests.get(overview, headers={"Authorization": "Bearer nope"},
                        timeout=10).status_code == 401
    assert requests.get(overview, headers=bearer, timeout=10).status_code == 200
    refused = requests.post(base + "/login", data={"token": "nope"}, allow_redirects=False,
                            timeout=10)
    assert refused.status_code == 401 and "set-cookie" not in refused.headers

    browser.get(base + "/")
    assert browser.find_elements(By.ID, "login")
    _sign_in(browser, "not the token")
    assert "not the REST API token" in browser.find_element(By.CSS_SELECTOR, ".error").text
    assert browser.get_cookie(f"broker_serve_status_{cluster.name}") is None
    _sign_in(browser, token)
    WebDriverWait(browser, 10, 0.05).until(lambda d: _updates(d) >= 1)
    cookie = browser.get_cookie(f"broker_serve_status_{cluster.name}")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP here; over HTTPS it is Secure
    assert token not in cookie["value"]
    assert "broker_serve_status" not in browser.execute_script("return document.cookie")
    browser.execute_script("window.notReloaded = true")

    # The page shows what the cluster's state says.
    details = requests.get(base + "/api/serve/applications/", headers=bearer, timeout=10).json()
    _page_shows(browser, details)
    state = redis.Redis.from_url(REDIS_URL)
    routes = orjson.loads(state.get(f"bs:{cluster.name}:routes"))
    proxies = {key.decode() for key in state.hkeys(f"bs:{cluster.name}:proxies")}
    assert _texts(browser, ".route .prefix") == sorted(routes["routes"])
    assert _texts(browser, ".route .route-target") == ["shop / Greeter"]
    assert set(_texts(browser, ".proxy .proxy-id")) == proxies and proxies
    assert _texts(browser, ".proxy .proxy-health") == ["HEALTHY"] * len(proxies)
    assert browser.find_element(By.CSS_SELECTOR, ".queue-depth").text == "0"
    assert browser.find_element(By.CSS_SELECTOR, ".deployment .ongoing").text == "0"
    assert _texts(browser, ".node .node-replicas") == ["2"]

    # It follows the cluster by itself: a replica that dies is a recent failure...
    assert _texts(browser, ".failure") == []
    victim = details["applications"]["shop"]["deployments"]["Greeter"]["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    WebDriverWait(browser, 15, 0.1).until(lambda d: _texts(d, ".failure .failure-kind"))
    failure = browser.find_element(By.CSS_SELECTOR, ".failure")
    assert failure.find_element(By.CSS_SELECTOR, ".failure-kind").text == "replica-died"
    assert victim["replica_id"] in failure.text and "shop / Greeter" in failure.text
    assert "exited unexpectedly" in failure.text

    # ...and so are a scale and a second application.
    requests.patch(base + "/api/serve/applications/shop/deployments/Greeter", headers=bearer,
                   json={"num_replicas": 1}, timeout=30).raise_for_status()
    serve.run(echo.options(autoscaling_config={"min_replicas": 1, "max_replicas": 2}).bind(),
              name="echo", route_prefix=HOSTILE_PREFIX)

    def settled() -> dict[str, Any] | None:
        details = requests.get(base + "/api/serve/applications/", headers=bearer,
                               timeout=10).json()
        shop = details["applications"]["shop"]["deployments"]["Greeter"]
        return details if len(shop["replicas"]) == 1 and all(
            app["status"] == "RUNNING" and all(dep["status"] == "HEALTHY"
                                               for dep in app["deployments"].values())
            for app in details["applications"].values()) else None

    details = wait_for(settled, timeout=20)
    _next_view(browser)
    _page_shows(browser, details)
    [autoscaled] = browser.find_elements(By.CSS_SELECTOR, "[data-app=echo] .autoscaling")
    assert autoscaled.text == "→ 1: started at 1 replica(s)"
    # Each replica's version, as the replica wrote it to its record.
    records = {key.decode(): orjson.loads(value)
               for key, value in state.hgetall(f"bs:{cluster.name}:replicas").items()}
    shown = {row.get_attribute("data-replica"): row.find_element(
        By.CSS_SELECTOR, ".replica-version span").get_attribute("title")
        for row in browser.find_elements(By.CSS_SELECTOR, "tr.replica")}
    assert len(shown) == 2
    assert shown == {replica: records[replica]["version"] for replica in shown}
    assert all(shown.values())
    assert _texts(browser, ".route .prefix") == sorted([HOSTILE_PREFIX, "/shop"])
    assert not browser.find_elements(By.TAG_NAME, "img")
    assert browser.title != "1"
    assert browser.execute_script("return window.notReloaded") is True

    browser.save_screenshot(str(tmp_path / "status-page.png"))
    wanted = os.environ.get("BROKER_SERVE_TEST_SCREENSHOT")
    if wanted:
        shutil.copyfile(tmp_path / "status-page.png", ROOT / wanted)

    browser.find_element(By.CSS_SELECTOR, "#logout button").click()
    WebDriverWait(browser, 10, 0.05).until(lambda d: d.find_elements(By.ID, "login"))
    assert browser.get_cookie(f"broker_serve_status_{cluster.name}") is None


def _load_shown(driver: webdriver.Chrome, app: str) -> dict[str, Any]:
    """The queued and ongoing cells of an application's one deployment and its replicas, read
    in one script: the page redraws its rows on every refresh."""
    return dict(driver.execute_script("""
        const card = document.querySelector(`.app[data-app="${arguments[0]}"]`);
        const row = card && card.querySelector("tr.deployment");
        if (!row) return {};
        const replicas = row.nextElementSibling.querySelectorAll("tr.replica");
        return {
          queued: row.querySelector(".queue-depth").textContent,
          ongoing: row.querySelector(".ongoing").textContent,
          replicas: Object.fromEntries([...replicas].map((r) => [
            r.dataset.replica, r.querySelector(".replica-ongoing").textContent])),
        };""", app))


def _wait_until_shown(driver: webdriver.Chrome, app: str, wanted: dict[str, Any]) -> None:
    """Wait for the page's own refresh to draw `wanted`; on a timeout, say what it drew."""
    try:
        WebDriverWait(driver, 15, 0.05).until(lambda d: _load_shown(d, app) == wanted)
    except TimeoutException:
        pytest.fail(f"the page shows {_load_shown(driver, app)}, not {wanted}", pytrace=False)


def test_the_status_page_shows_requests_held_running_and_queued(cluster, monkeypatch,
                                                                 browser, tmp_path):
    """One request runs in the deployment's one slot and two wait behind it: the page shows
    them as RabbitMQ and the replica's heartbeat count them, and shows 0 once they finish."""
    token = secrets.token_urlsafe(24)
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", token)
    handle = serve.run(Held.bind(str(tmp_path)), name="held", route_prefix="/held")
    base = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"
    bearer = {"Authorization": f"Bearer {token}"}
    names = Names(cluster.name)
    queue = names.request_queue("held", "Held")
    state = redis.Redis.from_url(REDIS_URL)

    def overview() -> dict[str, Any]:
        view = requests.get(base + status_page.OVERVIEW_PATH, headers=bearer, timeout=10)
        view.raise_for_status()
        [app] = view.json()["applications"]
        [dep] = app["deployments"]
        return dict(dep)

    browser.get(base + "/")
    _sign_in(browser, token)
    WebDriverWait(browser, 10, 0.05).until(lambda d: _updates(d) >= 1)
    [replica] = wait_for(lambda: [r["replica_id"] for r in overview()["replicas"]
                                  if r["state"] == "RUNNING"], timeout=30)
    idle = {"queued": "0", "ongoing": "0", "replicas": {replica: "0"}}
    _wait_until_shown(browser, "held", idle)
    assert overview()["queue"] == queue

    calls = []
    try:
        calls.append(handle.work.remote("running"))
        wait_for(lambda: _started(tmp_path) == ["running"], timeout=30, interval=0.02)
        for n in range(2):
            calls.append(handle.work.remote(f"queued-{n}"))
            wait_for(lambda n=n: _ready_messages(queue) == n + 1, timeout=10, interval=0.02)

        # The page catches up by itself; then nothing moves until the release, so every
        # source must say the same.
        held = {"queued": "2", "ongoing": "1", "replicas": {replica: "1"}}
        _wait_until_shown(browser, "held", held)
        assert _ready_messages(queue) == 2
        assert state.get(names.replica_alive(replica)) == b"1"
        dep = overview()
        assert (dep["queue_depth"], dep["ongoing_requests"]) == (2, 1)
        assert [r["ongoing_requests"] for r in dep["replicas"]] == [1]
        assert _started(tmp_path) == ["running"]  # the two queued wait in RabbitMQ
    finally:
        (tmp_path / "release").write_text("")  # nothing is left running, even on a failure
    assert [call.result(timeout_s=30) for call in calls] == ["running", "queued-0", "queued-1"]
    assert _started(tmp_path) == ["running", "queued-0", "queued-1"]

    _wait_until_shown(browser, "held", idle)
    assert _ready_messages(queue) == 0
    assert state.get(names.replica_alive(replica)) == b"0"
    dep = overview()
    assert (dep["queue_depth"], dep["ongoing_requests"]) == (0, 0)


def _page_client(monkeypatch: pytest.MonkeyPatch, base_url: str, **env: str) -> TestClient:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(cluster=f"t{secrets.token_hex(5)}")
    app = status_page.StatusPage(Store(REDIS_URL, settings.cluster), settings, "the-token")
    from starlette.applications import Starlette

    return TestClient(Starlette(routes=app.routes()), base_url=base_url)


def test_over_https_the_cookie_is_secure(monkeypatch):
    with _page_client(monkeypatch, "https://testserver") as client:
        signed_in = client.post("/login", data={"token": "the-token"}, follow_redirects=False)
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert all(flag in cookie for flag in ("HttpOnly", "SameSite=strict", "Secure"))
        assert "the-token" not in cookie
        assert client.get(status_page.OVERVIEW_PATH).status_code == 200
        client.post("/logout")
        assert client.get(status_page.OVERVIEW_PATH).status_code == 401


def test_a_public_page_needs_no_token(monkeypatch):
    with _page_client(monkeypatch, "http://testserver",
                      BROKER_SERVE_STATUS_PAGE_PUBLIC="1") as client:
        page = client.get("/")
        assert 'id="applications"' in page.text and 'id="login"' not in page.text
        view = client.get(status_page.OVERVIEW_PATH).json()
        assert view["public"] is True and view["applications"] == []
        assert client.get("/static/status.js").headers["content-type"].startswith(
            "text/javascript")
        assert client.get("/static/../page.py").status_code == 404


def test_the_assets_ship_in_the_package():
    shipped = Path(status_page.__file__).parent
    assert {"index.html", "login.html", "status.js", "status.css"} <= {
        path.name for path in shipped.iterdir()}
    assert "http" not in (shipped / "index.html").read_text()  # no CDN
