from decimal import Decimal

import pytest

from shop.pricing import cart_total, discount, money, with_vat


def test_money_rounds_half_up():
    assert money("1.005") == Decimal("1.01")


@pytest.mark.parametrize(("rate", "expected"), [("standard", "12.00"), ("reduced", "10.50"), ("zero", "10.00")])
def test_with_vat_applies_the_rate(rate, expected):
    assert with_vat(Decimal("10"), rate) == Decimal(expected)


def test_unknown_vat_rate_is_refused():
    with pytest.raises(KeyError):
        with_vat(Decimal("1"), "luxury")


def test_discount_takes_a_percentage_off():
    assert discount(Decimal("80"), 25) == Decimal("60.00")


@pytest.mark.parametrize("percent", [-1, 101])
def test_discount_outside_0_to_100_is_refused(percent):
    with pytest.raises(ValueError):
        discount(Decimal("1"), percent)


def test_cart_total_sums_lines_with_vat():
    assert cart_total([(Decimal("2.50"), 4), (Decimal("1"), 1)]) == Decimal("13.20")
