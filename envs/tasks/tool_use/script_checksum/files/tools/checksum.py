"""Print a checksum of a text file: the sum of (position * byte) over its bytes, mod 65521."""

import sys


def checksum(data: bytes) -> int:
    return sum(i * b for i, b in enumerate(data, start=1)) % 65521


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print(checksum(f.read()))
