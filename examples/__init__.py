"""Runnable sagaline examples: `robots` (the exploration saga) and `orders` (the shop)."""
