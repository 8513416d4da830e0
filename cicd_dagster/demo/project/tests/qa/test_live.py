"""QA of the deployed shop: run by cicd-dagster against an environment's stable address
($CICD_TARGET_URL) after a deploy there. Each request may reach another replica, so no
test reads back what another request wrote."""

import json
import os
import urllib.error
import urllib.request

import pytest

TARGET = os.environ["CICD_TARGET_URL"]
# No proxy from the environment: the environment's router listens on 127.0.0.1.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(TARGET + path, data=data, method="POST" if data else "GET")
    try:
        with DIRECT.open(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_service_is_healthy():
    assert call("/healthz") == (200, {"status": "ok"})


def test_an_order_can_be_placed():
    status, order = call("/orders", {"lines": [["5", 2], ["1.25", 4]]})
    assert status == 201
    assert isinstance(order["id"], int)


@pytest.mark.parametrize("path", ["/orders/999999", "/no-such-page"])
def test_unknown_paths_answer_404(path):
    status, _ = call(path)
    assert status == 404
