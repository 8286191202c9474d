"""Split sequences into consecutive fixed-size pieces."""


def chunks(items, size):
    """Consecutive pieces of ``items`` of length ``size``; the last one may be shorter."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items) - size + 1, size)]
