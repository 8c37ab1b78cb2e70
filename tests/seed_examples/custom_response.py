# Not code from the seed: the seed's text says __call__ may return a Starlette Response
# "to return a custom status code or custom headers". A minimal example in the same spirit.
import starlette.requests
import starlette.responses
import requests
from broker_serve import serve


@serve.deployment
class Creator:
    def __call__(self, request: starlette.requests.Request):
        return starlette.responses.Response(
            "created", status_code=201, headers={"X-Custom": "yes"}
        )


serve.run(Creator.bind())
resp = requests.get("http://localhost:8000")
assert resp.status_code == 201, resp.status_code
assert resp.headers["X-Custom"] == "yes", resp.headers
assert resp.text == "created", resp.text
