"""Ray 1.x calls (seed 001): route_prefix on the decorator, Deployment.deploy(),
serve.start(detached=True)."""

from __future__ import annotations

SCRIPT = '''
import requests
from fastapi import FastAPI
from broker_serve import serve

app = FastAPI()
serve.start(detached=True)

@app.get("/")
def f():
    return "Hello from the root!"

@serve.deployment(route_prefix="/api1")
@serve.ingress(app)
class FastAPIWrapper1:
    @app.get("/subpath")
    def method(self):
        return "Hello 1!"

@serve.deployment(route_prefix="/api2")
@serve.ingress(app)
class FastAPIWrapper2:
    @app.get("/subpath")
    def method(self):
        return "Hello 2!"

@serve.deployment
class Counter:
    def __init__(self, start):
        self.count = start

    def __call__(self, request):
        self.count += 1
        return {"count": self.count}

FastAPIWrapper1.deploy()
FastAPIWrapper2.deploy()
Counter.deploy(10)
base = "http://localhost:8000"
print(requests.get(base + "/api1").json(), requests.get(base + "/api2").json())
print(requests.get(base + "/api1/subpath").json(), requests.get(base + "/api2/subpath").json())
print(requests.get(base + "/Counter").json()["count"])
print(Counter.get_handle().remote(None).result()["count"])
Counter.delete()
print(requests.get(base + "/Counter").status_code)
'''


def test_deploy_serves_each_deployment_at_its_prefix(cluster):
    done = cluster.run_script(SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines == ["Hello from the root! Hello from the root!", "Hello 1! Hello 2!", "11",
                     "12", "404"]
