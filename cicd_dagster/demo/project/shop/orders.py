import json
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

from shop.pricing import cart_total


class OrderStore:
    def __init__(self, path: Path) -> None:
        # The HTTP API serves each request on its own thread.
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, lines TEXT, total TEXT)")

    def place(self, lines: list[tuple[Decimal, int]]) -> int:
        total = cart_total(lines)
        encoded = json.dumps([[str(price), quantity] for price, quantity in lines])
        with self.lock:
            cursor = self.db.execute("INSERT INTO orders (lines, total) VALUES (?, ?)", (encoded, str(total)))
            self.db.commit()
        return int(cursor.lastrowid or 0)

    def total(self, order_id: int) -> Decimal:
        with self.lock:
            row = self.db.execute("SELECT total FROM orders WHERE id = ?", (order_id,)).fetchone()
        if row is None:
            raise KeyError(order_id)
        return Decimal(row[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM orders").fetchone()[0])
