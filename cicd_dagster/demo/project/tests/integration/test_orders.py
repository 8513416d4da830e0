from decimal import Decimal

from shop.orders import OrderStore


def test_placed_order_is_stored_with_its_total(tmp_path):
    store = OrderStore(tmp_path / "orders.db")
    order = store.place([(Decimal("10"), 2)])
    assert store.total(order) == Decimal("24.00")


def test_orders_survive_reopening_the_store(tmp_path):
    OrderStore(tmp_path / "orders.db").place([(Decimal("1"), 1)])
    assert OrderStore(tmp_path / "orders.db").count() == 1
