"""Bump one package's version and open a changelog section for it.

Usage: ``python tools/bump.py adaattn-linalg minor`` (or ``major``/``patch``/an explicit
version). Rewrites ``src/<module>/__about__.py`` and turns the ``unreleased`` heading of the
package's CHANGELOG.md into the new version with today's date. Run
``python tools/check_constraints.py`` afterwards: siblings whose ranges no longer admit the new
version must be widened in the same change. The release tag is ``<package>-v<version>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re

from _workspace import packages


def next_version(current: str, part: str) -> str:
    """Return the version after ``current`` for ``part`` (major/minor/patch or explicit)."""
    if re.fullmatch(r"\d+\.\d+\.\d+", part):
        return part
    major, minor, patch = (int(x) for x in current.split(".")[:3])
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    if part == "patch":
        return f"{major}.{minor}.{patch + 1}"
    raise SystemExit(f"part must be major, minor, patch or X.Y.Z, not {part!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("package")
    parser.add_argument("part")
    args = parser.parse_args()
    pkgs = packages()
    if args.package not in pkgs:
        raise SystemExit(f"unknown package {args.package!r}; choose from {sorted(pkgs)}")
    pkg = pkgs[args.package]
    new = next_version(pkg.version, args.part)
    about = pkg.about.read_text()
    pkg.about.write_text(about.replace(f'"{pkg.version}"', f'"{new}"'))
    log = pkg.changelog.read_text()
    today = dt.date.today().isoformat()
    if re.search(r"^## .*unreleased", log, re.MULTILINE):
        log = re.sub(r"^## .*unreleased.*$", f"## {new} — {today}", log, count=1, flags=re.M)
    else:
        head, sep, rest = log.partition("\n## ")
        log = f"{head}\n## {new} — {today}\n\n- (describe the release)\n{sep}{rest}"
    pkg.changelog.write_text(log)
    print(f"{pkg.name}: {pkg.version} -> {new}; tag {pkg.name}-v{new}")


if __name__ == "__main__":
    main()
