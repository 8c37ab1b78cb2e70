"""The CLI's side of the REST API: one request at a time, errors as readable messages."""

from __future__ import annotations

from typing import Any

import orjson
import requests

from ..controller.api_token import ENV_VAR, client_token, token_file
from ..exceptions import BrokerServeError
from ..settings import Settings


class ApiError(BrokerServeError):
    pass


def default_address(settings: Settings) -> str:
    """The local controller's REST API: HTTPS where this host's settings give it a
    certificate."""
    return f"{settings.server_tls().scheme}://127.0.0.1:{settings.dashboard_port}"


class RestClient:
    def __init__(self, settings: Settings, address: str | None, token: str | None) -> None:
        self.settings = settings
        self.address = (address or default_address(settings)).rstrip("/")
        self.token = client_token(settings.cluster, token)

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 60.0) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = requests.request(
                method, self.address + path, headers=headers, timeout=timeout,
                verify=self.settings.client_tls().verify(),
                data=orjson.dumps(body) if body is not None else None)
        except requests.RequestException as exc:
            raise ApiError(f"cannot reach the REST API at {self.address}: is a controller "
                           f"running there? ({exc})") from exc
        if response.status_code == 401:
            raise ApiError(self._refused())
        if response.status_code >= 400:
            raise ApiError(f"the REST API answered {response.status_code}: "
                           f"{_detail(response)}")
        return response.json() if response.content else None

    def _refused(self) -> str:
        if not self.token:
            return (f"the REST API at {self.address} needs a token: pass --token, set "
                    f"{ENV_VAR}, or run on the controller's host, where "
                    f"{token_file(self.settings.cluster)} holds it")
        return f"the REST API at {self.address} refused the token"


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text
    if isinstance(detail, list):  # pydantic's errors
        return "\n" + "\n".join(
            f"  {'.'.join(str(part) for part in error.get('loc', ()))}: {error.get('msg')}"
            for error in detail)
    return str(detail)
