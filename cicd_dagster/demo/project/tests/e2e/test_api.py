import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


@pytest.fixture(scope="module")
def server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "shop.app", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_health_endpoint_answers(server):
    assert json.load(urllib.request.urlopen(server + "/healthz")) == {"status": "ok"}


def test_an_order_placed_over_http_can_be_read_back(server):
    body = json.dumps({"lines": [["5", 2]]}).encode()
    request = urllib.request.Request(server + "/orders", data=body, method="POST")
    order = json.load(urllib.request.urlopen(request))
    total = json.load(urllib.request.urlopen(f"{server}/orders/{order['id']}"))
    assert total == {"total": "12.00"}
