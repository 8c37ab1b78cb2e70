import requests
from fastapi import FastAPI
from broker_serve import serve

app = FastAPI()


@app.get("/")
def f():
    return "Hello from the root!"


@serve.deployment
@serve.ingress(app)
class FastAPIWrapper:
    pass


serve.run(FastAPIWrapper.bind(), route_prefix="/")
resp = requests.get("http://localhost:8000/")
assert resp.json() == "Hello from the root!"

# Added (not in the seed): the seed says automatic OpenAPI documentation generation
# "should work as-is", so the existing app's OpenAPI schema must be served too.
resp = requests.get("http://localhost:8000/openapi.json")
assert resp.status_code == 200, (resp.status_code, resp.text)
assert "/" in resp.json()["paths"], resp.json()
