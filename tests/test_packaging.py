"""The distributions' metadata, read from their pyproject.toml (issue #16, items 3 and 8), and what
their wheels hold (issue #13, item 3).

- The runtime wheels (kairos-core and the plugins) hold no test code: the test kit is
  ``kairos-testing`` (``testing/``), the only distribution that registers a pytest plugin.

- ``kairos-plugin-k3s`` depends on ``kairos-plugin-tunvpn``: k3s without the VPN runs on the
  machines' own addresses, which breaks as soon as the nodes are on different networks.
- Every dependency on a kairos distribution has a version range (pre-1.0: the next minor
  version may break the plugin API).
- Each declares the SPDX license ``Apache-2.0`` with a LICENSE file beside it (setuptools ≥ 77,
  no deprecated license table), a readme, and classifiers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from import_graph import imports_of

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {
    "kairos-core": ROOT,
    "kairos-plugin-tunvpn": ROOT / "plugins" / "tunvpn",
    "kairos-plugin-k3s": ROOT / "plugins" / "k3s",
    "kairos-plugin-kubevip": ROOT / "plugins" / "kubevip",
    "kairos-testing": ROOT / "testing",
}
# every runtime distribution: the core and each plugin in plugins/ (the ones added since too)
RUNTIME_DIRS = {
    "kairos-core": ROOT,
    **{
        tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"]: d
        for d in sorted((ROOT / "plugins").iterdir())
        if (d / "pyproject.toml").exists()
    },
}
RUNTIME = sorted(RUNTIME_DIRS)
# module names of the test kit, wherever they might creep back in
TEST_KIT = {"testing", "netlab", "labnodes", "labpartition", "localnodes", "testkit", "labvpn", "fakes", "conftest"}
TEST_ONLY_IMPORTS = {"pytest", "_pytest", "pytest_asyncio", "hypothesis", "kairos_testing"}


def _project(directory: Path) -> dict:
    return tomllib.loads((directory / "pyproject.toml").read_text())


def _requirements(directory: Path) -> dict[str, str]:
    """``name → version specifier`` of the distribution's runtime dependencies."""
    found = {}
    for line in _project(directory)["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", line)
        assert match, line
        found[match.group(1).lower()] = match.group(2)
    return found


def test_k3s_brings_the_vpn_along():
    assert "kairos-plugin-tunvpn" in _requirements(DISTRIBUTIONS["kairos-plugin-k3s"])


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_kairos_dependencies_are_pinned_to_a_compatible_range(name):
    directory = DISTRIBUTIONS[name]
    for requirement, specifier in _requirements(directory).items():
        if requirement in DISTRIBUTIONS:
            assert re.fullmatch(r">=\d+\.\d+,<\d+\.\d+", specifier), f"{name}: {requirement}{specifier}"
            lower, upper = (tuple(map(int, part.strip("<>=").split("."))) for part in specifier.split(","))
            version = tuple(map(int, _project(DISTRIBUTIONS[requirement])["project"]["version"].split(".")[:2]))
            assert lower <= version < upper, f"{name} does not accept {requirement} as it is in this repository"


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_license_readme_and_classifiers(name):
    directory = DISTRIBUTIONS[name]
    pyproject = _project(directory)
    project = pyproject["project"]
    assert project["name"] == name
    assert project["license"] == "Apache-2.0"  # SPDX, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (directory / "LICENSE").read_text()
    assert (directory / project["readme"]).read_text().strip()
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])
    # A license classifier next to an SPDX expression is an error for setuptools ≥ 77.
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS) + ["example"])
def test_every_package_ships_its_types(name):
    # PEP 561: without py.typed in the wheel, mypy treats an installed plugin API as untyped
    directory = DISTRIBUTIONS.get(name, ROOT / "examples" / "kairos-plugin-hello")
    package_data = _project(directory)["tool"]["setuptools"]["package-data"]
    assert len(package_data) == 1, package_data
    ((package, files),) = package_data.items()
    assert "py.typed" in files and (directory / package / "py.typed").is_file()


def test_the_plugins_carry_the_same_license_text():
    text = (ROOT / "LICENSE").read_text()
    for directory in DISTRIBUTIONS.values():
        assert (directory / "LICENSE").read_text() == text


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_project_urls_on_every_distribution(name):
    urls = _project(DISTRIBUTIONS[name])["project"]["urls"]
    assert urls and all(url.startswith("https://") for url in urls.values())


def test_the_c_extension_is_declared_where_setuptools_does_not_warn():
    # [tool.setuptools.ext-modules] made every build of tunvpn warn that it is experimental
    tunvpn = DISTRIBUTIONS["kairos-plugin-tunvpn"]
    assert "ext-modules" not in _project(tunvpn)["tool"]["setuptools"]
    setup = (tunvpn / "setup.py").read_text()
    assert '"kairos_plugin_tunvpn._fastpath"' in setup and "optional=True" in setup


def _package_dirs(name: str) -> list[Path]:
    directory = RUNTIME_DIRS[name]
    patterns = _project(directory)["tool"]["setuptools"]["packages"]["find"]["include"]
    return [path for pattern in patterns for path in directory.glob(pattern.rstrip("*")) if (path / "__init__.py").exists()]


@pytest.mark.parametrize("name", RUNTIME)
def test_the_runtime_packages_hold_no_test_kit_and_never_import_pytest(name):
    directories = _package_dirs(name)
    assert directories, name
    problems = []
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.stem in TEST_KIT and (path.suffix == ".py" or path.is_dir()):
                problems.append(f"{path.relative_to(ROOT)}: a test kit module")
            if path.suffix == ".py":
                problems += [
                    f"{path.relative_to(ROOT)}:{line}: imports {module}"
                    for line, module in imports_of(path)
                    if module.split(".")[0] in TEST_ONLY_IMPORTS
                ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", RUNTIME)
def test_only_the_test_kit_registers_a_pytest_plugin(name):
    assert "pytest11" not in _project(RUNTIME_DIRS[name])["project"].get("entry-points", {})


def test_the_test_kit_registers_its_pytest_plugin():
    project = _project(DISTRIBUTIONS["kairos-testing"])["project"]
    assert project["entry-points"]["pytest11"] == {"kairos": "kairos_testing.pytest_plugin"}
    assert "kairos-core>=0.1,<0.2" in project["dependencies"]


@pytest.mark.slow
def test_the_built_wheels_hold_what_they_should(tmp_path):
    # what a user installs, built as pip builds it: runtime wheels without any test code or
    # pytest entry point, the kit's wheel with its fakes and its plugin
    directories = [str(RUNTIME_DIRS[name]) for name in RUNTIME] + [str(DISTRIBUTIONS["kairos-testing"])]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), *directories],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheels = {path.name.split("-")[0].replace("_", "-"): zipfile.ZipFile(path) for path in tmp_path.glob("*.whl")}
    assert set(wheels) == {*RUNTIME, "kairos-testing"}
    for name in RUNTIME:
        names = wheels[name].namelist()
        kit = [n for n in names if n.endswith(".py") and Path(n).stem in TEST_KIT or "/fakes/" in n]
        assert not kit, f"{name}: {kit}"
        entry_points = [wheels[name].read(n).decode() for n in names if n.endswith("entry_points.txt")]
        assert not any("[pytest11]" in text for text in entry_points), name
        assert any(n.endswith("/py.typed") for n in names), name
    kit = wheels["kairos-testing"].namelist()
    assert {"kairos_testing/pytest_plugin.py", "kairos_testing/fakes/k3s.py", "kairos_testing/fakes/systemctl.py"} <= set(kit)
