"""The package's shape: no import cycles, no hidden function-local imports, and families and methods as data
(a new Llama-like family is one `register_family` call)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rotsparse
from rotsparse import families
from rotsparse.config import METHODS, SparsifyConfig
from rotsparse.families import FamilySpec, get_family, register_family
from rotsparse.runtime import TopKLinear
from rotsparse.topk import keep_topk

from tiny_models import invariance_error, random_tokens, tiny_config

PACKAGE = Path(rotsparse.__file__).parent
OPTIONAL_IMPORTS = {"lm_eval", "triton", "matplotlib", "pyarrow", "datasets", "pydoc_data", "vllm"}
"""Optional or heavy dependencies that may be imported inside a function (only where they are needed)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The rotsparse modules `name` imports at module level (relative and absolute imports), with the packages
    that importing them initialises (except `name`'s own parent packages, which are being initialised)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # a submodule, or a name that needs `base` initialised
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    parents = {name.rsplit(".", depth)[0] for depth in range(name.count(".") + 1)}
    with_packages = {module.rsplit(".", depth)[0] for module in found for depth in range(module.count(".") + 1)}
    return {module for module in with_packages if module in MODULES and module not in parents}


def test_module_level_imports_form_no_cycle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_function_local_imports_of_the_package_or_required_dependencies():
    local = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    roots = {"rotsparse" if node.level else (node.module or "").split(".")[0]}
                else:
                    continue
                local += [f"{name}:{node.lineno} imports {root}" for root in roots - OPTIONAL_IMPORTS]
    assert not local, local


def test_every_module_imports_alone():
    """Each module imported first, in a fresh import of the package (the order a cycle would break)."""
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'rotsparse' or m.startswith('rotsparse.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('OK')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_model_paths_are_reached_only_through_the_family_module():
    """Outside `families`, no code names a model's submodules (``self_attn``, ``q_proj``, ``model.layers``,
    "mlp", ...): every access goes through a `Family` / `Layer` (whose `o_proj`, `v_proj`, ... are its roles)."""
    raw = {"self_attn", "q_proj", "k_proj", "gate_proj", "act_fn", "rotary_emb"}
    names = raw | {"v_proj", "o_proj", "up_proj", "down_proj", "model.layers", "model.norm", "lm_head"}
    found = []
    for name, path in MODULES.items():
        if name == "rotsparse.families":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (node.attr in raw or (
                    node.attr in ("layers", "model") and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "model")):
                found.append(f"{name}:{node.lineno}: .{node.attr}")
            elif (isinstance(node, ast.Constant) and id(node) not in docstrings and isinstance(node.value, str)
                  and node.value in names):
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found, found


@pytest.fixture
def own_families(monkeypatch):
    """A private copy of the family registry, so registrations in a test do not outlive it."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))


def renamed_llama(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.rand_like(parameter) + 0.5)
    model.config.model_type = model_type
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_new_llama_like_family_is_one_registry_entry(own_families, method):
    model = renamed_llama("my_llama")
    with pytest.raises(NotImplementedError, match="my_llama"):
        get_family(model)
    register_family(FamilySpec(model_types=("my_llama",)))
    assert invariance_error(model, method=method) < 1e-4

    sparse = renamed_llama("my_llama")
    rotsparse.sparsify(sparse, sparsity=0.5, method=method, calibration=random_tokens(seed=7), progress=False)
    counts = []

    def check(module, args, output):
        nonzero = (keep_topk(args[0], module.keep_k) != 0).sum(-1)
        counts.append(bool((nonzero == module.keep_k).all()))

    handles = [m.register_forward_hook(check) for m in sparse.modules() if isinstance(m, TopKLinear)]
    with torch.no_grad():
        sparse(random_tokens())
    for handle in handles:
        handle.remove()
    assert counts and all(counts)
    assert abs(sparse.rotsparse_plan.effective_sparsity - 0.5) < 0.02


def test_methods_are_data_and_auto_options_are_saved_in_the_plan():
    options = rotsparse.AutoOptions(rotations=("identity", "pca"), per_reader=False)
    config = SparsifyConfig(options=options)
    data = config.to_dict()
    assert data["options"]["rotations"] == ("identity", "pca") and SparsifyConfig.from_dict(data) == config
    assert SparsifyConfig().to_dict()["options"] == SparsifyConfig().to_dict()["options"]
    assert SparsifyConfig.from_dict(SparsifyConfig().to_dict()) == SparsifyConfig()
    old = {key: value for key, value in SparsifyConfig(method="larosa").to_dict().items() if key != "options"}
    assert SparsifyConfig.from_dict(old).resolved_options == METHODS["larosa"].options  # plans saved before
    with pytest.raises(ValueError, match="fixed options"):
        SparsifyConfig(method="larosa", options=options)
    assert SparsifyConfig(method="topk").resolved_options is None
