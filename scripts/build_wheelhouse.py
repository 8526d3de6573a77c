"""A folder of wheels for every requirement, so that a node without internet installs from it with
`pip install --no-index --find-links wheelhouse ...` (the exact command is printed at the end; `-e .` is replaced by
this repository's own wheel, since an editable install would need setuptools from the index). Run through
`make wheelhouse`.

    make wheelhouse                                   # this machine's Python and platform, every requirement
    make wheelhouse WHEEL_TARGET="--python-version 3.12 --platform manylinux_2_28_x86_64"   # another node's
    # only what the node lacks: give its `pip list --format=freeze`, and optionally only some requirements
    python scripts/build_wheelhouse.py --out .whl --have node_freeze.txt --only deepspeed \
        --target "--python-version 3.12 --platform manylinux_2_28_x86_64"

DeepSpeed is published as a source archive only: it is built here into a pure-Python wheel (its C++ ops compile
on first use on the node, which needs a compiler there; DS_BUILD_OPS stays unset). This repository's own package
(vlm_recipes) is built as a wheel too. Everything else is downloaded as published wheels for the target, with
the dependency versions pip resolves for it.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SOURCE_ONLY = {"deepspeed"}  # no published wheels: built here


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])


def read_requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def with_older_manylinux(target: list[str]) -> list[str]:
    """pip's --platform matches a tag exactly, but a node with glibc 2.N installs every manylinux_2_M wheel for M <= N:
    "--platform manylinux_2_28_x86_64" alone finds no nvidia-cublas (tagged manylinux_2_27), so torch does not
    resolve. Each manylinux platform named is followed by every older one (and the legacy aliases) it implies."""
    platforms, rest, i = [], [], 0
    while i < len(target):
        arg = target[i]
        if arg == "--platform" and i + 1 < len(target):
            platforms.append(target[i + 1])
            i += 2
            continue
        if arg.startswith("--platform="):
            platforms.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    expanded = []
    for platform in platforms:
        implied = [platform]
        match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
        legacy = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", platform)
        if match or legacy:
            glibc_minor = int(match[1]) if match else LEGACY_MANYLINUX[legacy[1]]
            arch = match[2] if match else legacy[2]
            implied += [f"manylinux_2_{m}_{arch}" for m in range(glibc_minor, 4, -1)]
            implied += [f"{alias}_{arch}" for alias, m in LEGACY_MANYLINUX.items() if m <= glibc_minor]
        for name in implied:
            if name not in expanded:
                expanded.append(name)
    return rest + [arg for name in expanded for arg in ("--platform", name)]


def installed_on_node(freeze_file: Path | None) -> dict[str, str]:
    """{name: version} from the node's `pip list --format=freeze` (or `pip freeze`)."""
    if freeze_file is None:
        return {}
    have = {}
    for line in freeze_file.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            have[canonical(name)] = version.strip()
    return have


EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def dependencies(metadata: dict, extras: set[str]) -> list[tuple[str, set[str]]]:
    """(name, extras asked of it) for each requirement of a package, given the extras asked of that package:
    torch needs cuda-toolkit[cudart,...], and cuda-toolkit needs nvidia-cuda-runtime only "extra == 'cudart'"."""
    found = []
    for line in metadata.get("requires_dist", []):
        needs_extra = EXTRA_MARKER.search(line)
        if needs_extra and canonical(needs_extra[1]) not in extras:
            continue  # an optional feature nobody asked for
        requirement = Requirement(line)
        found.append((canonical(requirement.name), {canonical(extra) for extra in requirement.extras}))
    return found


def packages_to_fetch(by_name: dict, roots: list, have: dict[str, str], specifiers: dict) -> list[str]:
    """name==version of every resolved package reachable from the roots, stopping at those the node has (at a
    version the requirements accept). by_name: pip's --report items by canonical name; roots: (name, extras)."""
    asked: dict[str, set[str]] = {}
    pending, fetch = list(roots), {}
    while pending:
        name, extras = pending.pop()
        if name not in by_name or (name in asked and extras <= asked[name]):
            continue  # not for this platform, or already walked with these extras
        asked[name] = asked.get(name, set()) | extras
        if name in have and Version(have[name]) in specifiers.get(name, SpecifierSet()):
            continue
        metadata = by_name[name]["metadata"]
        if name not in SOURCE_ONLY:
            fetch[name] = f"{name}=={metadata['version']}"
        pending += dependencies(metadata, asked[name])
    return list(fetch.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="wheelhouse")
    parser.add_argument("--requirements", default=str(REPO / "requirements.txt"))
    parser.add_argument(
        "--target", default="", help="pip's --python-version/--platform/--abi for another node"
    )
    parser.add_argument("--have", type=Path, help="the node's `pip list --format=freeze`: skip what it has")
    parser.add_argument("--only", nargs="*", help="requirement names to include (default: all)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    requirements = read_requirements(Path(args.requirements))
    if args.only:
        wanted = {canonical(name) for name in args.only}
        requirements = [line for line in requirements if requirement_name(line) in wanted]
    target = with_older_manylinux(shlex.split(args.target))

    # 1. The source-only requirements, as wheels built here; and this repository's package.
    for line in requirements:
        if requirement_name(line) in SOURCE_ONLY:
            pip("wheel", "--no-deps", "--quiet", "-w", str(out), line)
    if not args.only:
        pip("wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO))

    # 2. Resolve the whole dependency tree for the target (metadata only), using the wheels built above.
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch, "report.json")
        pip(
            "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
            "--find-links", str(out), "--target", str(Path(scratch, "t")), "--report", str(report),
            *target, *requirements,
        )  # fmt: skip
        resolved = json.loads(report.read_text())["install"]

    # 3. Download what the node lacks: walk the dependency tree from the requirements, and stop at every package
    # the node has (its own build, e.g. torch for its CUDA, brings its own dependencies).
    by_name = {canonical(item["metadata"]["name"]): item for item in resolved}
    roots = [
        (requirement_name(line), {canonical(e) for e in Requirement(line).extras}) for line in requirements
    ]
    # A package the node has at a version the requirements refuse (pillow 12 for pillow>=13, say) is fetched too.
    specifiers = {requirement_name(line): Requirement(line).specifier for line in requirements}
    missing = packages_to_fetch(by_name, roots, installed_on_node(args.have), specifiers)
    if missing:
        pip("download", "--no-deps", "--quiet", "--only-binary=:all:", "-d", str(out), *target, *missing)
    wheels = sorted(p.name for p in out.glob("*.whl"))
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
    print(f"{out}: {len(wheels)} wheels, {size:.0f} MiB. On the node:")
    packages = [shlex.quote(line) for line in requirements] + ([] if args.only else ["vlm-recipes"])
    print(f"  pip install --no-index --find-links {out} {' '.join(packages)}")


if __name__ == "__main__":
    main()
