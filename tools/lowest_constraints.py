"""Write a pip constraints file pinning every ``>=`` lower bound the packages declare.

``nox -s tests-min`` installs against it, so a declared range is a tested promise. torch is the
exception: its lowest admitted release is not installable on the CPU machines (only the local
2.13.0 wheel is), so torch stays at the version in tools/constraints-cpu.txt; the GPU machine
runs torch 2.11.
"""

from __future__ import annotations

import argparse
import re

from _workspace import packages, split_requirement

SKIP = {"torch": "only the local CPU wheel (2.13.0) is installable without a CUDA build"}


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    pins: dict[str, str] = {}
    for pkg in packages().values():
        for req in pkg.requirements:
            name, spec, _ = split_requirement(req)
            if name in SKIP:
                print(f"skip {name}: {SKIP[name]}")
                continue
            m = re.search(r">=\s*([0-9][^,\s]*)", spec)
            if m:
                pins[name] = max(pins.get(name, m.group(1)), m.group(1), key=_key)
    with open(args.output, "w") as fh:
        for name, version in sorted(pins.items()):
            fh.write(f"{name}=={version}\n")
            print(f"pin  {name}=={version}")


if __name__ == "__main__":
    main()
