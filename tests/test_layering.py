"""Dependencies point one way: core <- onnx <- plugins; the core never imports a framework,
amct_onnx never imports a training framework, and the plugins never import each other.

The source checks read the files of this checkout and run everywhere. The metadata and import
checks need the plugin installed (and its framework, for the import check) and skip where the
stack under test leaves it out: the tf-latest stack installs no torch and no amct_pytorch.
"""
import ast
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = {"torch", "tensorflow", "onnx", "onnxruntime", "keras", "tf2onnx"}
TENSORFLOW_DISTRIBUTIONS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos",
                            "tensorflow-intel", "tensorflow-estimator", "keras", "tf-keras",
                            "tf2onnx"}


def _imported_roots(package_dir: Path) -> set[str]:
    roots = set()
    for source in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def _requirement_names(distribution: str) -> set[str]:
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed in this test environment")
    return {canonicalize_name(Requirement(req).name) for req in requirements}


def _modules_loaded_by(statement: str, roots: set[str]) -> list[str]:
    """The modules under ``roots`` in sys.modules after ``statement``, in a fresh interpreter."""
    code = (f"import json, sys; {statement};"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(roots)!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _require_importable(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed in this test environment")


def test_core_source_imports_no_framework():
    roots = _imported_roots(ROOT / "packages" / "amct_core" / "src" / "amct_core")
    assert not roots & FRAMEWORKS
    assert not roots & {"amct_pytorch", "amct_tensorflow", "amct_onnx"}


def test_importing_the_core_loads_no_framework():
    loaded = _modules_loaded_by("import amct_core, amct_core.decompose, amct_core.logger, "
                                "amct_core.errors", FRAMEWORKS)
    assert loaded == []


def test_onnx_package_imports_no_training_framework_or_plugin():
    roots = _imported_roots(ROOT / "packages" / "amct_onnx" / "src" / "amct_onnx")
    assert "amct_core" in roots and "onnx" in roots
    assert not roots & {"torch", "torchvision", "tensorflow", "keras", "tf2onnx",
                        "amct_pytorch", "amct_tensorflow"}


def test_onnx_package_requires_no_training_framework():
    names = _requirement_names("amct-onnx")
    assert {"amct-core", "onnx", "onnxruntime"} <= names
    assert not names & ({"torch", "torchvision"} | TENSORFLOW_DISTRIBUTIONS)


def test_importing_the_onnx_package_loads_no_training_framework():
    _require_importable("onnx", "onnxruntime", "amct_onnx")
    loaded = _modules_loaded_by("import amct_onnx, amct_onnx.cli",
                                {"torch", "tensorflow", "keras", "amct_pytorch",
                                 "amct_tensorflow"})
    assert loaded == []


def test_pytorch_plugin_imports_no_other_plugin_or_tensorflow():
    roots = _imported_roots(ROOT / "packages" / "amct_pytorch" / "src" / "amct_pytorch")
    assert not roots & {"tensorflow", "keras", "tf2onnx", "amct_tensorflow"}


def test_pytorch_plugin_requires_no_tensorflow():
    names = _requirement_names("amct-pytorch")
    assert {"amct-core", "amct-onnx", "torch"} <= names
    assert not names & TENSORFLOW_DISTRIBUTIONS


def test_importing_the_pytorch_plugin_loads_no_tensorflow():
    _require_importable("torch", "amct_pytorch")
    loaded = _modules_loaded_by("import amct_pytorch, amct_pytorch.tensor_decompose; "
                                "amct_pytorch.quantize_model",
                                {"tensorflow", "keras", "tf2onnx", "amct_tensorflow"})
    assert loaded == []


def test_tensor_decompose_does_not_load_onnx_runtime():
    _require_importable("torch", "amct_pytorch")
    loaded = _modules_loaded_by("import amct_pytorch.tensor_decompose", {"onnxruntime"})
    assert loaded == []


def test_tensorflow_plugin_imports_no_other_plugin_or_torch():
    roots = _imported_roots(ROOT / "packages" / "amct_tensorflow" / "src" / "amct_tensorflow")
    assert not roots & {"torch", "torchvision", "amct_pytorch", "amct_onnx"}


def test_tensorflow_plugin_requires_no_torch_or_tensorflow():
    # TensorFlow ships as several distributions (tensorflow, tensorflow-cpu, ...): the plugin
    # leaves the choice to the user and declares none of them.
    names = _requirement_names("amct-tensorflow")
    assert "amct-core" in names
    assert not names & ({"torch", "torchvision"} | TENSORFLOW_DISTRIBUTIONS)


def test_importing_the_tensorflow_plugin_loads_no_torch():
    _require_importable("tensorflow", "amct_tensorflow")
    loaded = _modules_loaded_by("import amct_tensorflow, amct_tensorflow.tensor_decompose",
                                {"torch", "torchvision", "amct_pytorch"})
    assert loaded == []
