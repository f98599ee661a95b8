"""The order saga of the celery-saga README, on sagaline: validate, charge, reserve, confirm.

sagaline worker -A examples.orders.app                      # one terminal
python -m examples.orders --amount 99.99                    # another
python -m examples.orders --sku widget --quantity 999      # out of stock: refunded
"""
