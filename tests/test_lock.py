"""The lock files and pyproject.toml agree: every dependency has a bounded major version,
and the locks pin, with hashes, a release each bound allows.

An unbounded `redis>=5` once pulled in a client whose default read timeout closed every
idle WebSocket; these checks keep upgrades a deliberate `make lock`.
"""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
DEV = [Requirement(line) for line in EXTRAS["dev"]]
# The benchmark's baseline server (FastAPI, uvicorn): in the dev lock, never the runtime one.
BENCH = [Requirement(line) for line in EXTRAS["bench"]]
BUILD = [Requirement(line) for line in PYPROJECT["build-system"]["requires"]]


def locked(name: str) -> dict[str, tuple[Version, int]]:
    """The lock's pins that apply here: package -> (version, number of hashes)."""
    pins: dict[str, tuple[Version, int]] = {}
    current: str | None = None
    for line in (ROOT / name).read_text().splitlines():
        stripped = line.strip().removesuffix("\\").strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("--hash="):
            if current is not None:  # None: a pin for another platform or Python
                version, hashes = pins[current]
                pins[current] = (version, hashes + 1)
            continue
        requirement = Requirement(stripped)
        current = None
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{name}: {stripped} is not pinned"
        current = canonicalize_name(requirement.name)
        pins[current] = (Version(specifier.version), 0)
    return pins


@pytest.mark.parametrize("requirement", RUNTIME + DEV + BENCH + BUILD, ids=str)
def test_every_dependency_has_a_bounded_major_version(requirement: Requirement) -> None:
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), (
        f"{requirement} in pyproject.toml has no upper bound: add one below the next major"
    )


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("requirements-dev.txt", RUNTIME + DEV + BENCH),
        ("requirements.txt", RUNTIME),
        ("requirements-pip.txt", [Requirement("pip")]),
    ],
)
def test_the_lock_pins_with_hashes_a_release_pyproject_allows(
    lock: str, requirements: list[Requirement]
) -> None:
    pins = locked(lock)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {lock}: run `make lock UPGRADE=`"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock} pins {name}=={version}, outside pyproject.toml's {requirement}: "
            "run `make lock UPGRADE=`"
        )
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"{lock} pins without a hash: {unhashed}"


def test_the_runtime_lock_pins_the_versions_the_tests_ran_with() -> None:
    everything = locked("requirements-dev.txt")
    runtime = locked("requirements.txt")
    differ = {
        name: (str(version), str(everything.get(name, (None,))[0]))
        for name, (version, _) in runtime.items()
        if everything.get(name, (None,))[0] != version
    }
    assert not differ, f"requirements.txt and requirements-dev.txt disagree: {differ}"


def test_the_runtime_lock_leaves_out_the_benchmark_only_packages() -> None:
    runtime = locked("requirements.txt")
    leaked = [r.name for r in BENCH if canonicalize_name(r.name) in runtime]
    assert not leaked, f"requirements.txt pins benchmark-only packages: {leaked}"
