"""The product package stands without the lab: it never imports the lab, the
demo's fixtures or the test helpers; `vmbackup lab` and `vmbackup demo` load
the lab (package vmbackup_lab, from lab/python) only when run."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vmbackup

PACKAGE = Path(vmbackup.__file__).resolve().parent
# The only modules that may name the lab, and only inside a function.
LAZY_DISPATCHERS = {"cli/lab.py", "cli/demo.py"}
FOREIGN = ("vmbackup_lab", "conftest", "tests", "labkit", "pytest")


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, node.module


def test_no_product_module_imports_the_lab_or_test_helpers():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for node, name in _imports(tree):
            if name.split(".")[0] not in FOREIGN:
                continue
            if rel in LAZY_DISPATCHERS and name.split(".")[0] == "vmbackup_lab" and id(node) not in top_level:
                continue
            offences.append(f"{rel}:{node.lineno} imports {name}")
    assert offences == []


IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import vmbackup
names = [m.name for m in pkgutil.walk_packages(vmbackup.__path__, "vmbackup.") if not m.name.endswith("__main__")]
# The flows and their tasks (orchestration/) are Prefect code; everything
# else, the command line (cli/, its flow-running commands included) and the
# local server (localserver/) included, must load without Prefect.
flows = [n for n in names if n.startswith("vmbackup.orchestration.")]
assert {"vmbackup.cli.backup", "vmbackup.cli.maintain", "vmbackup.localserver.server", "vmbackup.localserver.runs"} <= set(names)
for name in names:
    if name not in flows:
        importlib.import_module(name)
from vmbackup.cli import build_parser
build_parser()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("vmbackup_lab", "prefect", "pytest", "conftest"))
assert loaded == [], loaded
for name in flows:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("vmbackup_lab", "pytest", "conftest"))
assert loaded == [], loaded
assert "prefect" in sys.modules and len(flows) >= 2, flows
assert len(names) >= 12, names
print(len(names))
"""


def test_importing_every_product_module_loads_no_lab_and_no_prefect():
    p = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


# vmbackup_lab made unimportable, as on a machine where only the product is installed.
WITHOUT_LAB = "import sys; sys.modules['vmbackup_lab'] = None; from vmbackup.cli import main; sys.exit(main())"


def test_without_the_lab_the_product_works_and_lab_commands_say_so(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", WITHOUT_LAB, *args], capture_output=True, text=True)

    assert run("init", "--repo", str(tmp_path / "r")).returncode == 0
    assert run("snapshots", "--repo", str(tmp_path / "r")).returncode == 0
    assert "lab" in run("--help").stdout
    for args in (["lab", "status", "--state", str(tmp_path)], ["lab"], ["demo", "--dir", str(tmp_path / "d")]):
        p = run(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.splitlines() == [
            "vmbackup: error: the lab is not installed (`make dev` installs it: pip install -e lab/python)"
        ]
    assert not (tmp_path / "d").exists()


def test_lab_commands_reach_the_lab_package(tmp_path):
    """`vmbackup lab` keeps its contract: here, bad input is one line and exit 2."""
    p = subprocess.run(
        [sys.executable, "-m", "vmbackup", "lab", "status", "--state", str(tmp_path)], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no lab is running" in p.stderr, p.stderr


# The hypervisor adapters and the one per-VM procedure (hypervisors/procedure.py)
# are plain Python: orchestration is the only Prefect code.
NO_PREFECT = ("hypervisors/", "vsphere/", "hyperv/", "pointmeta.py", "results.py", "errors.py", "planning.py")


def test_adapters_and_the_run_core_never_import_prefect():
    checked, offences = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith(NO_PREFECT):
            continue
        checked.append(rel)
        for node, name in _imports(ast.parse(path.read_text(), str(path))):
            if name.split(".")[0] == "prefect" or ".orchestration" in f".{name}":
                offences.append(f"{rel}:{node.lineno} imports {name}")
        # relative imports of the orchestration package (from ..orchestration import x)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").startswith("orchestration"):
                offences.append(f"{rel}:{node.lineno} imports .{node.module}")
    assert offences == []
    assert {"hypervisors/base.py", "hypervisors/procedure.py", "vsphere/procedure.py", "hyperv/procedure.py"} <= set(
        checked
    )
