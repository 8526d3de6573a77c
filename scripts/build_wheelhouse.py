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
    target = shlex.split(args.target)

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
    have = installed_on_node(args.have)
    # A package the node has at a version the requirements refuse (pillow 12 for pillow>=13, say) is fetched too.
    specifiers = {requirement_name(line): Requirement(line).specifier for line in requirements}
    by_name = {canonical(item["metadata"]["name"]): item for item in resolved}
    wanted, missing, seen = [requirement_name(line) for line in requirements], [], set()
    while wanted:
        name = wanted.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        if name in have and Version(have[name]) in specifiers.get(name, SpecifierSet()):
            continue
        metadata = by_name[name]["metadata"]
        if name not in SOURCE_ONLY:
            missing.append(f"{name}=={metadata['version']}")
        # "extra ==" requirements belong to optional features nobody asked for.
        wanted += [
            requirement_name(dep) for dep in metadata.get("requires_dist", []) if "extra ==" not in dep
        ]
    if missing:
        pip("download", "--no-deps", "--quiet", "--only-binary=:all:", "-d", str(out), *target, *missing)
    wheels = sorted(p.name for p in out.glob("*.whl"))
    size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
    print(f"{out}: {len(wheels)} wheels, {size:.0f} MiB. On the node:")
    packages = [shlex.quote(line) for line in requirements] + ([] if args.only else ["vlm-recipes"])
    print(f"  pip install --no-index --find-links {out} {' '.join(packages)}")


if __name__ == "__main__":
    main()
