"""The package's shape: every module imports on its own (no hidden reliance on another module having been
imported first), and the import graph of its modules' top-level imports has no cycle."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sft_sharded"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """Our modules that `path` imports at its top level (imports inside functions run later, on demand)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            # `from package import module` depends on that module; `from module import name` on the module.
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}
    return found


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        stack.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) == len(modules) > 50


def test_every_module_imports_on_its_own():
    names = sorted(_modules())
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sft_sharded' or m.startswith('sft_sharded.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" + repr(names) + "))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(names)}" in result.stdout


def test_the_command_line_reads_its_arguments_before_jax_is_imported():
    """`simulate_devices` works only when jax starts after the config is read: importing the CLI and
    building its parser (every subcommand's flags, `plan`'s included) must not import jax."""
    script = ("import sys\nimport sft_sharded.cli as cli\ncli._parser().parse_args(['plan', '--topology', 'v5p-8', "
              "'--model', 'tiny'])\nprint('jax' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
