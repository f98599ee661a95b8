"""Place one order: `python -m examples.orders [--amount A] [--sku S] [--quantity N]`."""

from __future__ import annotations

import argparse
import sys
import uuid

from sagaline import SagaError, SagaOutcomeError

from .tasks import order_saga


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.orders")
    parser.add_argument("--order-id", default=None)
    parser.add_argument("--amount", type=float, default=99.99)
    parser.add_argument("--sku", default="widget")
    parser.add_argument("--quantity", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    order_id = args.order_id or f"order-{uuid.uuid4().hex[:8]}"
    handle = order_saga.run(
        order_id=order_id,
        amount=args.amount,
        sku=args.sku,
        quantity=args.quantity,
        idempotency_key=order_id,
    )
    try:
        handle.get(timeout=args.timeout)
    except SagaOutcomeError as exc:
        print(f"{handle.saga_id} {handle.status.value} {exc.cause}")
        return 0
    except SagaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{handle.saga_id} {handle.status.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
