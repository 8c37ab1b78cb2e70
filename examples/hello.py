"""The example application: `broker-serve run examples.hello:app`, then
`curl "localhost:8000/?name=you"` and `curl localhost:8000/stream`."""

import asyncio

from fastapi import FastAPI
from starlette.responses import StreamingResponse

from broker_serve import serve

api = FastAPI()


@serve.deployment(num_replicas=2)
@serve.ingress(api)
class Hello:
    def __init__(self) -> None:
        self.greeting = "Hello"

    @api.get("/")
    def greet(self, name: str = "world") -> dict[str, str]:
        return {"message": f"{self.greeting}, {name}!",
                "replica": serve.get_replica_context().replica_id}

    @api.get("/stream")
    async def stream(self, count: int = 5) -> StreamingResponse:
        async def numbers():
            for i in range(count):
                yield f"{i}\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(numbers(), media_type="text/plain")


app = Hello.bind()
