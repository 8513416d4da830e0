from decimal import Decimal

from shop.pricing import cart_total


def test_cart_total_of_100_lines(benchmark):
    lines = [(Decimal("1.99"), n % 7 + 1) for n in range(100)]
    assert benchmark(cart_total, lines) > 0
