"""Check that every sibling requirement admits the sibling's current version.

Usage: ``python tools/check_constraints.py``. Exits non-zero, naming the offending range, when a
package pins a sibling to a range that its current ``__about__`` version falls outside of, or
when a package names a sibling by path instead of by version range.
"""

from __future__ import annotations

import sys

from _workspace import packages, split_requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


def main() -> int:
    pkgs = packages()
    errors: list[str] = []
    for pkg in pkgs.values():
        for req in pkg.requirements:
            name, spec, _ = split_requirement(req)
            if name not in pkgs:
                continue
            if "@" in req or "file:" in req:
                errors.append(f"{pkg.name}: names sibling {name} by path ({req!r}); use a range")
                continue
            if not spec:
                errors.append(f"{pkg.name}: sibling {name} has no version range")
                continue
            current = Version(pkgs[name].version)
            if current not in SpecifierSet(spec):
                errors.append(
                    f"{pkg.name}: requires {name}{spec}, but {name} is at {current}: "
                    f"widen the range or bump with tools/bump.py"
                )
            else:
                print(f"ok  {pkg.name:20s} -> {name}{spec} admits {current}")
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
