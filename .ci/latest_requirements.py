"""Print megammr's requirements with every upper bound widened to the next major version.

The drift check (`MEGAMMR_CI_LATEST=1 bash .ci/run`) installs these instead of constraints.txt, so
the suite meets the newest releases within each dependency's major version (0.x: within 0.x) before
a user does. The upper bounds in pyproject.toml are what CI tested; when the drift run passes with a
newer release, raise the bound and regenerate constraints.txt (README, "Tested versions").

Usage: python .ci/latest_requirements.py EXTRA [EXTRA ...] > latest.txt
       pip freeze | python .ci/latest_requirements.py --diff constraints.txt   (what moved)
"""
import re
import sys
import tomllib
from pathlib import Path

# torch comes from this machine's disk (torch==2.13.0, installed first): never widened.
KEEP = {"torch"}


def widen(req: str) -> str:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*?)\s*(;.*)?$", req)
    name, spec, marker = m.group(1), m.group(2), m.group(3) or ""
    if name.split("[")[0].lower() in KEEP or "<" not in spec:
        return req
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    lower = next((p for p in parts if p.startswith(">=")), None)
    keep = [p for p in parts if not p.startswith("<")]
    if lower is None:
        return name + ",".join(keep) + marker
    major = int(lower[2:].split(".")[0])
    return f"{name}{','.join(keep + [f'<{major + 1}'])}{marker}"


def pins(lines) -> dict[str, str]:
    """`name==version` lines (pip freeze, constraints.txt) as {normalized name: version}."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def diff(constraints: str) -> None:
    pinned, installed = pins(Path(constraints).read_text().splitlines()), pins(sys.stdin)
    moved = [(n, pinned.get(n, "-"), v) for n, v in sorted(installed.items())
             if n != "torch" and pinned.get(n) != v]
    for name, old, new in moved:
        print(f"  {name}: {old} -> {new}")
    print(f"  ({len(moved)} of {len(installed)} installed distributions differ)")


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for e in extras:
        reqs += project["optional-dependencies"][e]
    for r in reqs:
        print(widen(r))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--diff"]:
        diff(sys.argv[2])
    else:
        main(sys.argv[1:])
