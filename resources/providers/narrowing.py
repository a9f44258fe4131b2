"""Finding per-customer values from group totals (Polar's read-back strategy: its
meter quantities can be filtered by a list of customers, so a group whose total
matches the ledger needs no further calls)."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), max(1, size))]


def narrow_down(
    customers: Iterable[str],
    expected: dict[str, int],
    total_of: Callable[[list[str] | None], int],
    group_size: int = 100,
) -> tuple[dict[str, int], set[str], int]:
    """Find each customer's recorded value with few aggregate queries.

    `total_of(None)` is the provider's total for everybody, `total_of(group)` for a
    group of customers at once. Where a total equals what the ledger says was sent
    (`expected`), every member is taken to hold its expected value; where it differs,
    the group is split in halves — only the left half is asked, the right half is the
    difference — down to single customers. Returns (values, customers read exactly,
    seconds held for customers outside `customers`). Offsetting errors inside one
    group (one customer +x, another −x) cancel out and stay invisible to the sums."""
    members = sorted(set(customers))
    values: dict[str, int] = {}
    exact: set[str] = set()
    if not members:
        return values, exact, 0

    def want(group: list[str]) -> int:
        return sum(expected.get(customer, 0) for customer in group)

    root = total_of(None)
    if root == want(members):
        return {customer: expected.get(customer, 0) for customer in members}, exact, 0

    def split(group: list[str], total: int) -> None:
        while True:
            if total == want(group):
                values.update({customer: expected.get(customer, 0) for customer in group})
                if len(group) == 1:
                    exact.add(group[0])
                return
            if len(group) == 1:
                values[group[0]] = total
                exact.add(group[0])
                return
            middle = len(group) // 2
            left, right = group[:middle], group[middle:]
            left_total = total_of(left)
            split(left, left_total)
            group, total = right, total - left_total

    attributed = 0
    for chunk in _chunks(members, group_size):
        chunk_total = total_of(chunk)
        attributed += chunk_total
        split(chunk, chunk_total)
    return values, exact, root - attributed
