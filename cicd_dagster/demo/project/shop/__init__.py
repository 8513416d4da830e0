"""A tiny shop: prices, a cart, an order store and an HTTP API."""
