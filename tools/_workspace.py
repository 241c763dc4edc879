"""Read the monorepo's packages: names, versions and declared requirements (stdlib only)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"
_VERSION_RE = re.compile(r'^__version__\s*=\s*"([^"]+)"', re.MULTILINE)
_REQ_RE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*([^;]*)(?:;(.*))?$")


@dataclass(frozen=True)
class Package:
    name: str
    path: Path
    module: str
    version: str
    requirements: tuple[str, ...]

    @property
    def about(self) -> Path:
        return self.path / "src" / self.module / "__about__.py"

    @property
    def changelog(self) -> Path:
        return self.path / "CHANGELOG.md"


def split_requirement(req: str) -> tuple[str, str, str]:
    """Split ``name[extra] specifier ; marker`` into (normalised name, specifier, marker)."""
    m = _REQ_RE.match(req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    return name, m.group(2).strip(), (m.group(3) or "").strip()


def packages() -> dict[str, Package]:
    """All packages under packages/, keyed by distribution name."""
    found = {}
    for pyproject in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        project = data["project"]
        module = Path(data["tool"]["hatch"]["version"]["path"]).parent.name
        about = pyproject.parent / data["tool"]["hatch"]["version"]["path"]
        match = _VERSION_RE.search(about.read_text())
        if not match:
            raise SystemExit(f'{about}: no __version__ = "..." line')
        found[project["name"]] = Package(
            name=project["name"],
            path=pyproject.parent,
            module=module,
            version=match.group(1),
            requirements=tuple(project.get("dependencies", ())),
        )
    return found
