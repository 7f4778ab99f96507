"""Dependencies point one way: core <- plugins; the core never imports a framework."""
import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = {"torch", "tensorflow", "onnx", "onnxruntime", "keras", "tf2onnx"}


def _imported_roots(package_dir: Path) -> set[str]:
    roots = set()
    for source in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


def test_core_source_imports_no_framework():
    roots = _imported_roots(ROOT / "packages" / "amct_core" / "src" / "amct_core")
    assert not roots & FRAMEWORKS
    assert not roots & {"amct_pytorch", "amct_tensorflow", "amct_onnx"}


def test_importing_the_core_loads_no_framework():
    code = ("import sys, amct_core, amct_core.decompose, amct_core.logger, amct_core.errors;"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"


def test_pytorch_plugin_imports_no_other_plugin_or_tensorflow():
    roots = _imported_roots(ROOT / "packages" / "amct_pytorch" / "src" / "amct_pytorch")
    assert not roots & {"tensorflow", "keras", "amct_tensorflow"}


def test_pytorch_plugin_requires_no_tensorflow():
    requirements = importlib.metadata.requires("amct-pytorch") or []
    names = {req.split("@")[0].split(">")[0].split("=")[0].split(";")[0].strip().lower()
             for req in requirements}
    assert {"amct-core", "torch"} <= names
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx"}
