"""pyproject.toml against the Comfy Registry's rules (docs.comfy.org/registry/specifications,
and what comfy-cli's config parser accepts) and against requirements.txt."""
import re

import pytest

from conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# comfy-cli keeps accelerator classifiers only from this set (and drops all if one is unknown)
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")


def test_node_id_follows_the_registry_rules():
    name = PROJECT["name"]
    assert len(name) < 100
    # letters, digits, - _ . ; no leading digit or special character, no two specials in a row
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)
    assert "comfyui" not in name.lower()


def test_version_is_semver():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])


def test_licence_is_apache_with_its_text():
    assert PROJECT["license"] == "Apache-2.0"  # comfy-cli sends a string licence as its text
    text = (REPO / PROJECT["license-files"][0]).read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_classifiers_are_ones_the_registry_reads():
    for classifier in PROJECT["classifiers"]:
        kind, _, value = classifier.partition(" :: ")
        assert kind in ("Operating System", "Environment"), classifier
        if kind == "Operating System":
            assert value.startswith(OS_PREFIXES), classifier
        else:
            assert value in ACCELERATORS, classifier


def test_urls_and_icon():
    repository = PROJECT["urls"]["Repository"]
    assert repository.startswith("https://github.com/")
    assert COMFY["PublisherId"] and COMFY["DisplayName"]
    # the icon is served from this repository's main branch: the file must be here
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert COMFY["Icon"].startswith(prefix)
    assert (REPO / COMFY["Icon"].removeprefix(prefix)).is_file()
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"])


def test_dependencies_are_requirements_txt():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert PROJECT["dependencies"] == requirements
    assert not any(re.match(r"torch\b", r) for r in requirements)  # ComfyUI's torch is never replaced

