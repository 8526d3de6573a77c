"""scripts/build_wheelhouse.py: the target platforms (pip matches --platform exactly, so a manylinux target must
name every older tag the node accepts, or torch's CUDA wheels, manylinux_2_27, are not found for a 2_28 node) and
the walk that decides which resolved packages to download (the extras a parent asks for, what the node has)."""

import importlib.util

from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("build_wheelhouse", REPO / "scripts" / "build_wheelhouse.py")
build_wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_wheelhouse)


def platforms(target):
    return [target[i + 1] for i, arg in enumerate(target) if arg == "--platform"]


def test_a_manylinux_target_names_every_older_tag_once():
    target = build_wheelhouse.with_older_manylinux(
        ["--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--platform=manylinux2014_x86_64"]
    )
    assert target[:2] == ["--python-version", "3.12"]
    named = platforms(target)
    assert named[0] == "manylinux_2_28_x86_64"  # the node's own tag stays first: pip prefers it
    assert "manylinux_2_27_x86_64" in named  # nvidia-cublas 13.1, nvidia-cudnn-cu13 9.19
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(named)
    assert "manylinux_2_29_x86_64" not in named
    assert len(named) == len(set(named)) == 24 + 3  # 2_28 .. 2_5, and the three legacy aliases


def test_other_platforms_are_left_as_named():
    assert build_wheelhouse.with_older_manylinux(["--platform", "win_amd64", "--abi", "cp312"]) == [
        "--abi", "cp312", "--platform", "win_amd64",
    ]  # fmt: skip
    assert build_wheelhouse.with_older_manylinux(["--platform", "manylinux2010_aarch64"])[1::2] == [
        "manylinux2010_aarch64", *[f"manylinux_2_{m}_aarch64" for m in range(12, 4, -1)], "manylinux1_aarch64",
    ]  # fmt: skip


def resolved(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


# The shape of torch 2.12's dependency tree on Linux, as pip's --report gives it.
TREE = {
    "torch": resolved(
        "torch", "2.12.0", "cuda-toolkit[cudart]==13.0.2; platform_system == 'Linux'", "sympy>=1.13"
    ),
    "cuda-toolkit": resolved(
        "cuda-toolkit",
        "13.0.2",
        'nvidia-cuda-runtime==13.0.*; extra == "cudart"',
        'nvidia-cufft; extra == "cufft"',
    ),
    "nvidia-cuda-runtime": resolved("nvidia-cuda-runtime", "13.0.96"),
    "sympy": resolved("sympy", "1.14.0", "mpmath<1.4", 'pytest; extra == "dev"'),
    "mpmath": resolved("mpmath", "1.3.0"),
    "peft": resolved("peft", "0.21.0", "torch>=1.13", "pyyaml"),
    "pyyaml": resolved("pyyaml", "6.0.3"),
}


def test_extras_a_parent_asks_for_are_fetched_and_no_others():
    fetched = build_wheelhouse.packages_to_fetch(TREE, [("peft", set())], have={}, specifiers={})
    assert sorted(fetched) == [
        "cuda-toolkit==13.0.2",
        "mpmath==1.3.0",
        "nvidia-cuda-runtime==13.0.96",
        "peft==0.21.0",
        "pyyaml==6.0.3",
        "sympy==1.14.0",
        "torch==2.12.0",
    ]  # no nvidia-cufft, no pytest: extras nobody asked for


def test_the_walk_stops_at_what_the_node_has_unless_the_requirements_refuse_its_version():
    roots = [("torch", set()), ("peft", set())]
    have = {"torch": "2.11.0", "pyyaml": "5.4"}
    specifiers = {"torch": SpecifierSet(">=2.11,<3"), "pyyaml": SpecifierSet(">=6.0")}
    fetched = build_wheelhouse.packages_to_fetch(TREE, roots, have, specifiers)
    assert sorted(fetched) == ["peft==0.21.0", "pyyaml==6.0.3"]  # the node's torch brings its own CUDA wheels
