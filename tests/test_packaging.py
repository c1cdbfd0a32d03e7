"""Packaging: nothing at the repository root stands in for an installed package, however Python is
started there; the wheel installs ``genrec_fast.kernels`` and no top-level ``kernels``; ``--version``."""
import importlib.machinery
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# importable at the root on purpose: the package itself, and setup.py (setuptools wants that name)
OWN = {"genrec_fast", "setup"}


def root_importables() -> set:
    """Names that ``import NAME`` finds at the root when it is on sys.path: packages and modules."""
    suffixes = tuple(importlib.machinery.all_suffixes())
    names = set()
    for p in ROOT.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir() and (p / "__init__.py").is_file():
            names.add(p.name)
        elif p.is_file() and p.name.endswith(suffixes):
            names.add(p.name.split(".")[0])
    return names


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _python(args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def test_the_root_holds_kernels_and_the_check_sees_it():
    # the check below runs over whatever is importable at the root; kernels/ is the case that broke
    assert "kernels" in root_importables()


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_no_root_name_shadows_an_installed_package(tmp_path, how):
    """For every importable name at the root, an installed package of that name (a stand-in on
    PYTHONPATH, which comes after the root on sys.path) is what ``import NAME`` and ``import NAME.sub``
    give with the root as the working directory, started as ``python -c`` and ``python -m``."""
    names = sorted(root_importables() - OWN)
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
        (site / name / "sub.py").write_text("VALUE = 7\n")
    probe = ("import importlib, sys\n"
             f"for name in {names!r}:\n"
             "    m = importlib.import_module(name)\n"
             "    sub = importlib.import_module(name + '.sub')\n"
             "    assert getattr(m, 'ORIGIN', None) == 'installed', (name, m.__file__)\n"
             "    assert sys.modules[name] is m and sub.VALUE == 7, name\n"
             "print('ok', len(sys.argv))\n")
    if how == "-c":
        args = ["-c", probe]
    else:
        (site / "shadow_probe.py").write_text(probe)
        args = ["-m", "shadow_probe"]
    r = _python(args, PYTHONPATH=str(site))
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]


def test_a_root_name_with_no_installed_package_is_an_empty_namespace():
    """Without site-packages (-S), ``import kernels`` from the root gives what a folder without
    ``__init__.py`` would: an empty namespace package (no file, no version, nothing inside), so
    nothing of ours ever stands in for a package of that name."""
    for name in sorted(root_importables() - OWN):
        probe = (f"import importlib, {name} as m\n"
                 "assert getattr(m, '__file__', None) is None and not hasattr(m, '__version__'), vars(m)\n"
                 "assert list(m.__path__) == [] and m.__spec__.origin is None, m.__spec__\n"
                 "for sub in ('rq', 'beam', 'sub'):\n"
                 "    try:\n"
                 f"        importlib.import_module('{name}.' + sub)\n"
                 "    except ModuleNotFoundError:\n"
                 "        pass\n"
                 "    else:\n"
                 "        raise AssertionError(sub)\n"
                 "print('ok')\n")
        r = _python(["-S", "-c", probe])
        assert r.returncode == 0 and r.stdout.startswith("ok"), (name, r.stderr[-2000:])


def _site_without(tmp_path, dist: str) -> Path:
    """This interpreter's site-packages as links in one folder, the package ``dist`` and its metadata left
    out: a machine where it is not installed (transformers 5.17 does not depend on Hugging Face's kernels)."""
    site = tmp_path / f"site-without-{dist}"
    site.mkdir()
    for d in (Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()):
        for entry in d.iterdir():
            if entry.name == dist or entry.name.startswith((f"{dist}-", f"{dist}.")) or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    return site


def test_model_code_and_cli_start_from_the_root_without_hugging_faces_kernels(tmp_path):
    """With no Hugging Face ``kernels`` installed and the root as cwd, transformers' probe finds our folder,
    imports it and must read it as not installed: its model code, ours and the CLI import."""
    site = _site_without(tmp_path, "kernels")
    code = (f"import site, sys; site.addsitedir({str(site)!r})\n"
            "import kernels, runpy\n"
            "assert kernels.__file__ is None, kernels.__file__\n"
            "from transformers.utils import is_kernels_available\n"
            "assert not is_kernels_available()\n"
            "from transformers import Qwen2ForCausalLM, GPT2LMHeadModel\n"
            "import genrec_fast.model, genrec_fast.decode\n"
            "sys.argv = ['genrec-fast', '--version']\n"
            "runpy.run_module('genrec_fast.cli', run_name='__main__')\n")
    r = _python(["-S", "-c", code])
    assert r.returncode == 0 and r.stdout.startswith("genrec-fast "), r.stderr[-3000:]


def test_model_code_and_cli_start_from_the_root():
    """What the issue saw fail: transformers' model code (which imports Hugging Face's kernels), the CLI
    as ``python -m``, and our kernels under their installed name — all with the root as cwd."""
    code = ("from transformers import Qwen2ForCausalLM\n"
            "import importlib.util, pathlib\n"
            "spec = importlib.util.find_spec('genrec_fast.kernels.rq')\n"
            f"assert pathlib.Path(spec.origin).resolve() == pathlib.Path({str(ROOT / 'kernels' / 'rq.py')!r})\n"
            "import kernels  # Hugging Face's, or the empty namespace when it is not installed\n"
            "assert kernels.__file__ is None or not pathlib.Path(kernels.__file__).resolve().is_relative_to("
            f"{str(ROOT / 'kernels')!r}), kernels.__file__\n")
    r = _python(["-c", code])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _python(["-m", "genrec_fast.cli", "eval", "--help"])
    assert r.returncode == 0 and "--model" in r.stdout, r.stderr[-3000:]


def test_version():
    from genrec_fast import __version__
    from genrec_fast.cli import main

    r = _python(["-m", "genrec_fast.cli", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"genrec-fast {__version__} (torch ") and "transformers " in r.stdout
    assert main(["-V"]) == 0


@pytest.mark.slow
def test_wheel_installs_kernels_under_genrec_fast_only(tmp_path):
    """A wheel (C++ extension built) holds genrec_fast and its dist-info only; installed, its kernels
    import as genrec_fast.kernels from the wheel, and ``import kernels`` stays Hugging Face's."""
    wheels = tmp_path / "wheels"
    r = _python(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = wheels.glob("genrec_fast-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
    assert {n.split("/")[0] for n in names} == {"genrec_fast", whl.name.split("-")[0] + "-" + whl.name.split("-")[1]
                                                + ".dist-info"}
    assert {"genrec_fast/kernels/__init__.py", "genrec_fast/kernels/rq.py", "genrec_fast/kernels/beam.py"} <= set(names)
    site = tmp_path / "site"
    r = _python(["-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    code = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
            "import importlib.util, pathlib, genrec_fast.kernels.rq as rq\n"
            f"assert pathlib.Path(rq.__file__).is_relative_to({str(site)!r}), rq.__file__\n"
            "spec = importlib.util.find_spec('kernels')  # Hugging Face's, or none\n"
            f"assert spec is None or not pathlib.Path(spec.origin).is_relative_to({str(site)!r}), spec.origin\n"
            "from genrec_fast import SIDTrie; assert SIDTrie([[0, 1]], codebook_sizes=2).contains([[0, 1]])[0]\n")
    r = _python(["-I", "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
