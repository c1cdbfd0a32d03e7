"""Ahead-of-time compilation of a Triton kernel for an H100 (sm_90) on a machine without a GPU: the Triton
interpreter runs none of Triton's GPU lowering, this does (ptxas included), so a kernel that would not compile,
would not use the tensor cores, or would spill registers is caught here. Runs in a subprocess without
TRITON_INTERPRET (the test process has it set before triton was imported)."""
import json
import os
import subprocess
import sys
from typing import List, Optional

import pytest

_SCRIPT = r"""
import importlib, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
names = fn.arg_names
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
out = []
for c in spec["configs"]:
    const = c["const"]
    sig = {a: "constexpr" if a in const else c["types"].get(a, "i32") for a in names}
    # as a launch specialises them: 16-byte aligned pointers, sizes and strides that are multiples of 16
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in c["aligned"]}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=c["options"])
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                           text=True).stdout
    line = next(l for l in usage.splitlines() if "REG:" in l)
    fields = dict(x.split(":") for x in line.split() if ":" in x)
    ptx = k.asm["ptx"]
    out.append({"wgmma": "wgmma" in ptx, "mma": "wgmma" in ptx or "mma.sync" in ptx,
                "regs": int(fields["REG"]), "stack": int(fields["STACK"])})
print(json.dumps(out))
"""


def compile_sm90(module: str, kernel: str, configs: List[dict], device) -> Optional[List[dict]]:
    """Compile ``module.kernel`` for sm_90 once per config ({"const": constexpr values, "types": Triton types of
    the non-i32 arguments ("*bf16", "fp32", ...), "aligned": arguments specialised as multiples of 16, "options":
    num_warps / num_stages}) -> per config {"wgmma", "mma" (tensor-core dots in the PTX), "regs", "stack" (spill
    bytes)}. Skips the test on a GPU (the other tests compile and run the kernel there) and where triton ships no
    NVIDIA binaries."""
    if device.type == "cuda":
        pytest.skip("on a GPU the kernel is compiled and run by the other tests")
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton's NVIDIA backend binaries (ptxas, cuobjdump) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = {"module": module, "kernel": kernel, "configs": configs}
    res = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(spec)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
