#!/usr/bin/env python3
"""check_sass.py - what a GPU-less CI can check of a kernel's shape: reads the sm_90 SASS of the
scoring kernels (the object of kernels/score.cu) with cuobjdump and asserts, for their f16 and bf16
instantiations (with keys of the same type, and with fp8 e4m3 keys widened in shared memory: "f16+fp8",
"bf16+fp8"; KNORM's fp8 reader "fp8"), the properties they are built for:

  tensor-core kernels (--tensor-core, default the normaliser and column-sum kernels):
      HMMA instructions (mma.sync on tensor cores), 128-bit K loads (LDGSTS.*.128 from cp.async,
      or LDG.*.128), no local memory (no LDL / STL: spills and register arrays indexed at run time)
  key-loading kernels (--wide-loads, default also write_scores, KNORM's reader): 128-bit loads
  every kernel of the objects: no local memory.

Prints registers, static shared memory (with the 1 KiB sm_90 reserves per block; the kernels' tiles
are dynamic shared memory, sized at launch) and stack per kernel (cuobjdump -res-usage). Exit status: 0
when every check holds, 1 when one fails (each failure is printed), 77 (ctest's skip) when there
is no cuobjdump to run: then nothing was checked, and it says so.

  check_sass.py --cuobjdump PATH [--arch sm_90] [--tensor-core REGEX] [--wide-loads REGEX] OBJECT...
Objects other than score.cu's (file name score.cu.o) are ignored, so a target's whole object list may
be passed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

SKIP = 77
# template arguments of the 16-bit instantiations in mangled names, and of the fp8 key type
HALF_TYPES = {"6__half": "f16", "13__nv_bfloat16": "bf16"}
FP8_KEYS = "7Fp8E4M3"
CHECKED = {"tensor-core": ("f16", "bf16", "f16+fp8", "bf16+fp8"),
           "wide-loads": ("f16", "bf16", "f16+fp8", "bf16+fp8", "fp8")}


def run(cuobjdump, *args):
    out = subprocess.run([cuobjdump, *args], check=True, capture_output=True, text=True)
    return out.stdout


def functions(sass):
    """{mangled name: [opcode, ...]} from cuobjdump -sass output."""
    result, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            result[name] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and name:
            result[name].append(m.group(1))
    return result


def resources(text):
    """{mangled name: 'REG:.. SHARED:.. LOCAL:..'} from cuobjdump -res-usage output."""
    result, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            result[name] = fields
            name = None
    return result


def kernel_label(name):
    """(kernel, dtype, head_dim) of a mangled kernel name: the nested name's components after _ZN
    are length-prefixed; the kernel is the one ending in _kernel. dtype is the queries' type, with
    "+fp8" for fp8 keys ("fp8" alone for a kernel templated on the key type only)."""
    kernel, i = name, name.find("_ZN") + 3
    while 3 <= i < len(name) and name[i].isdigit():
        m = re.match(r"\d+", name[i:])
        start = i + m.end()
        component = name[start:start + int(m.group())]
        i = start + int(m.group())
        if component.endswith("_kernel"):
            kernel = component
            break
    dtype = next((label for key, label in HALF_TYPES.items() if key in name), None)
    if dtype is None and re.search(r"_kernelIf", name):
        dtype = "f32"
    if FP8_KEYS in name:
        dtype = dtype + "+fp8" if dtype else "fp8"
    dim = re.search(r"Li(\d+)E", name)
    return kernel, dtype, dim.group(1) if dim else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuobjdump", default="")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--tensor-core", default=r"(normaliser|column_sums)_kernel")
    parser.add_argument("--wide-loads", default=r"(normaliser|column_sums|write_scores)_kernel")
    parser.add_argument("objects", nargs="*")
    args = parser.parse_args()

    cuobjdump = args.cuobjdump or shutil.which("cuobjdump") or ""
    if not cuobjdump or not os.access(cuobjdump, os.X_OK):
        print("SKIPPED: no cuobjdump (not in the CUDA toolkit, not given with --cuobjdump / KVC_CUOBJDUMP); "
              "scripts/test.sh installs PyPI's nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into build/tools-venv. Nothing was checked.")
        return SKIP
    objects = [o for o in args.objects if os.path.basename(o).startswith("score.cu")]
    if not objects:
        print(f"FAIL: no score object among {args.objects}")
        return 1

    failures, checked = [], {"tensor-core": set(), "wide-loads": set()}
    for obj in objects:
        sass = functions(run(cuobjdump, "-sass", "-arch", args.arch, obj))
        usage = resources(run(cuobjdump, "-res-usage", "-arch", args.arch, obj))
        if not sass:
            failures.append(f"{obj}: no {args.arch} SASS in it (built for other architectures?)")
            continue
        print(f"{obj} ({args.arch}):")
        print(f"  {'kernel':<28} {'type':<9} {'dim':>4} {'regs':>5} {'smem':>6} {'stack':>5} "
              f"{'HMMA':>5} {'LDGSTS.128':>10} {'LDG.128':>7} {'LDL/STL':>7}")
        for name, ops in sorted(sass.items(), key=lambda item: kernel_label(item[0])):
            kernel, dtype, dim = kernel_label(name)
            res = usage.get(name, {})
            hmma = sum(op.startswith("HMMA") for op in ops)
            ldgsts = sum(op.startswith("LDGSTS") and op.endswith(".128") for op in ops)
            ldg128 = sum(op.startswith("LDG.") and op.endswith(".128") for op in ops)
            local = sum(op.split(".")[0] in ("LDL", "STL") for op in ops)
            print(f"  {kernel:<28} {dtype or '-':<9} {dim:>4} {res.get('REG', '?'):>5} {res.get('SHARED', '?'):>6} "
                  f"{res.get('STACK', '?'):>5} {hmma:>5} {ldgsts:>10} {ldg128:>7} {local:>7}")
            where = f"{kernel}<{dtype}, {dim}>"
            if local:
                failures.append(f"{where}: {local} local-memory instructions (LDL/STL)")
            if re.search(args.tensor_core, kernel) and dtype in CHECKED["tensor-core"]:
                checked["tensor-core"].add((kernel, dtype))
                if not hmma:
                    failures.append(f"{where}: no HMMA: its logits are not on tensor cores")
            if re.search(args.wide_loads, kernel) and dtype in CHECKED["wide-loads"]:
                checked["wide-loads"].add((kernel, dtype))
                if not ldgsts and not ldg128:
                    failures.append(f"{where}: no 128-bit global loads (LDGSTS/LDG .128): K is read narrower")
    for what, pattern in (("tensor-core", args.tensor_core), ("wide-loads", args.wide_loads)):
        found = checked[what]
        for dtype in CHECKED[what]:
            if not any(d == dtype for _, d in found):
                failures.append(f"no {dtype} kernel matching /{pattern}/ ({what} check) in {objects}")
    for failure in failures:
        print("FAIL:", failure)
    if failures:
        return 1
    print(f"PASS: tensor cores, 128-bit loads and no local memory in {len(checked['tensor-core'])} tensor-core "
          f"and {len(checked['wide-loads'])} key-loading kernel instantiations (f16, bf16, fp8 keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
