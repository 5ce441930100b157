"""`make bench`: every benchmark of oars-fast, in one process, in a fixed order."""
from __future__ import annotations

from . import degradation


def main() -> None:
    degradation.main([])


if __name__ == "__main__":
    main()
