from decimal import ROUND_HALF_UP, Decimal

VAT_RATES = {"standard": Decimal("0.20"), "reduced": Decimal("0.05"), "zero": Decimal("0")}


def money(value: str | int | Decimal) -> Decimal:
    return Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def with_vat(net: Decimal, rate: str = "standard") -> Decimal:
    if rate not in VAT_RATES:
        raise KeyError(f"unknown VAT rate {rate!r}")
    return money(net * (1 + VAT_RATES[rate]))


def discount(total: Decimal, percent: int) -> Decimal:
    if not 0 <= percent <= 100:
        raise ValueError("percent must be between 0 and 100")
    return money(total * (100 - percent) / 100)


def cart_total(lines: list[tuple[Decimal, int]], rate: str = "standard") -> Decimal:
    net = sum((price * quantity for price, quantity in lines), Decimal(0))
    return with_vat(net, rate)
