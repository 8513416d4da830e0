"""python -m shop.app --port PORT: a JSON API over the order store."""

import argparse
import json
import tempfile
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from shop.orders import OrderStore


def make_handler(store: OrderStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"})
            elif self.path.startswith("/orders/"):
                try:
                    self._send(200, {"total": str(store.total(int(self.path.rsplit("/", 1)[1])))})
                except (KeyError, ValueError):
                    self._send(404, {"error": "no such order"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            lines = [(Decimal(p), int(q)) for p, q in json.loads(self.rfile.read(length))["lines"]]
            self._send(201, {"id": store.place(lines)})

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    store = OrderStore(Path(tempfile.mkdtemp()) / "orders.db")
    ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(store)).serve_forever()


if __name__ == "__main__":
    main()
