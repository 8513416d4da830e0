"""Analytics over the history DB and the Dagster instance's records: plain typed Python
returning DataFrames and dataclasses; every figure says "no data" for an empty period."""
