"""The layout is the architecture: what each layer of dvm_core, and each plugin, may import.

Read from the source (every import statement, including those inside functions), so a lazy
import cannot slip past.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "dvm_core"

# The plugin API: dvm_core's top level. It may use the pure protocol code, nothing else of the core.
PLUGIN_API = {"dvm_core", "dvm_core.hookspecs", "dvm_core.jobs", "dvm_core.errors", "dvm_core.params",
              "dvm_core.archives", "dvm_core.childproc", "dvm_core.datarefs", "dvm_core.charts",
              "dvm_core.launch", "dvm_core.devices", "dvm_core.transcripts"}

# Each layer and the layers of dvm_core it may import (besides the plugin API's pure parts).
LAYERS = {
    "protocol": {"protocol"},
    "transport": {"protocol", "transport"},
    "state": {"protocol", "state"},
    "payments": {"protocol", "transport", "state", "payments"},
    "worker": {"protocol", "transport", "state", "payments", "worker"},
    "customer": {"protocol", "transport", "state", "payments", "customer"},
    "devtools": {"protocol", "transport", "state", "payments", "worker", "customer", "devtools"},
    "cli": {"protocol", "transport", "state", "payments", "worker", "customer", "devtools", "cli"},
}
IO_MODULES = {"socket", "sqlite3", "httpx", "aiohttp", "websockets", "subprocess", "asyncio", "urllib.request"}
PLUGINS = ["dvm_image_classifier", "dvm_llm_finetune", "dvm_fedavg"]
STDLIB = set(sys.stdlib_module_names)


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)   # `from pkg import module`
    return found


def modules(root: Path, top: str):
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), ".".join(parts) if is_package else ".".join(parts[:-1])


def core_layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def real_modules(names: set[str]) -> set[str]:
    """Of `name.attr` forms, keep those that are modules of dvm_core (or its packages)."""
    out = set()
    for name in names:
        if name.startswith("dvm_core"):
            path = ROOT / Path(*name.split("."))
            if path.with_suffix(".py").exists() or (path / "__init__.py").exists() or name == "dvm_core":
                out.add(name)
        else:
            out.add(name)
    return out


CORE_MODULES = list(modules(CORE, "dvm_core"))


@pytest.mark.parametrize("path,name,package", CORE_MODULES, ids=[m[1] for m in CORE_MODULES])
def test_each_core_module_imports_only_its_layer_and_below(path, name, package):
    imported = real_modules(imports_of(path, package))
    layer = core_layer(name)
    for target in sorted(imported):
        top = target.split(".")[0]
        # devices.py is the plugins' one rule for torch devices: torch inside its functions only
        # (test_importing_the_core_loads_no_torch), called by plugins, never by the core.
        heavy = ("transformers", "accelerate", "peft") if name == "dvm_core.devices" else \
            ("torch", "transformers", "accelerate", "peft")
        assert top not in (*heavy, *PLUGINS), f"{name} imports {target}: the core never imports torch or a plugin"
        if top != "dvm_core" or target in PLUGIN_API:
            continue
        target_layer = core_layer(target)
        if layer is None:   # the plugin API: the pure protocol code only
            assert target_layer == "protocol", f"plugin API module {name} imports {target}"
        else:
            assert target_layer in LAYERS[layer], f"{name} ({layer}) imports {target} ({target_layer})"


@pytest.mark.parametrize("path,name,package", [m for m in CORE_MODULES if core_layer(m[1]) == "protocol"
                                               or m[1] in ("dvm_core.jobs", "dvm_core.errors", "dvm_core.params",
                                                           "dvm_core.datarefs", "dvm_core.hookspecs",
                                                           "dvm_core.transcripts")],
                         ids=lambda m: m if isinstance(m, str) else "")
def test_protocol_code_and_the_plugin_contract_do_no_io(path, name, package):
    imported = {i for i in imports_of(path, package) if i.split(".")[0] in STDLIB or "." not in i}
    io = sorted(i for i in imported if i in IO_MODULES or i.split(".")[0] in {"httpx", "aiohttp", "websockets"})
    allowed = {"dvm_core.jobs": {"asyncio"}}   # JobContext.sleep, for async jobs
    assert set(io) <= allowed.get(name, set()), f"{name} imports {io}"


PLUGIN_MODULES = [m for p in PLUGINS for m in modules(ROOT / "plugins" / p, p)] + \
    list(modules(ROOT / "examples" / "dvm-textstats" / "dvm_textstats", "dvm_textstats"))


@pytest.mark.parametrize("path,name,package", PLUGIN_MODULES, ids=[m[1] for m in PLUGIN_MODULES])
def test_plugins_import_only_the_plugin_api(path, name, package):
    own = name.split(".")[0]
    for target in sorted(real_modules(imports_of(path, package))):
        top = target.split(".")[0]
        if top == "dvm_core":
            assert target in PLUGIN_API, f"{name} imports {target}, outside the plugin API"
        else:
            assert top == own or top not in PLUGINS, f"{name} imports another plugin: {target}"


@pytest.mark.parametrize("package", ["dvm_federate", "dvm_verify"])
def test_federated_rounds_and_spot_checks_are_customer_software(package):
    """`dvm federate` and `dvm verify` use the customer's API and the plugins' public functions,
    not the worker."""
    for path, name, package in modules(ROOT / "plugins" / package, package):
        for target in sorted(real_modules(imports_of(path, package))):
            assert not target.startswith(("dvm_core.worker", "dvm_core.state.store", "dvm_core.payments.cashier")), \
                f"{name} imports {target}"


def test_importing_the_core_loads_no_torch():
    import subprocess
    names = [name for _, name, _ in CORE_MODULES if not name.endswith("__main__")]
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + \
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
