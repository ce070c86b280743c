#!/usr/bin/env python3
"""SASS properties of the selection and compaction kernels (ctest label `sass`).

Reads the sm_90 SASS of a libkvcompress build with cuobjdump and checks, per kernel:
  - no local-memory traffic (LDL / STL: spills or dynamically indexed arrays) in any kernel of
    select.cu, compact.cu and retention.cu;
  - 128-bit loads where the data is contiguous: the selection kernels that stream a row's scores
    (staging warp and block rows, the split rows' digit passes and output) load them as
    LDG.E.128, and compaction's 16-byte copy (compact_kernel<uint4>) loads and stores its K/V
    vectors as LDG.E.128 / STG.E.128.

    check_select_compact.py [--cuobjdump PATH] [--arch sm_90] LIBRARY
Exit status 0 when every rule holds, 1 with one line per violation, 2 when the SASS could not be
read, 77 (ctest's skip) when there is no cuobjdump to run: then nothing was checked, and it says so. The rules table below is what a reviewer edits when a kernel changes.
"""
import argparse
import re
import shutil
import subprocess
import sys

SKIP = 77

# (kernel name regex, instruction regexes that must appear at least once)
RULES = [
    (r"select_warp_rows_kernel", [r"\bLDG\.E\.128\b"]),
    (r"select_block_rows_kernel", [r"\bLDG\.E\.128\b"]),
    (r"select_split_pass_kernel", [r"\bLDG\.E\.128\b"]),
    (r"select_split_output_kernel", [r"\bLDG\.E\.128\b"]),
    (r"select_split_init_kernel", []),
    (r"compact_kernelI5uint4E", [r"\bLDG\.E\.128\b", r"\bSTG\.E\.128\b"]),
    (r"compact_kernel", []),
    (r"(prepare|claim_pages|probe_sources|find_readers)_kernel", []),
    (r"retention_kernel", []),
]
LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9.]+)?\b")
OUR_FILES = re.compile(r"_(select|compact|retention)_cu_")


def functions(sass):
    """(mangled name, body) of every function in cuobjdump -sass output."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("library")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    if not args.cuobjdump or not shutil.which(args.cuobjdump):
        print(f"check_select_compact: no cuobjdump ({args.cuobjdump!r}): nothing checked, skipped")
        return SKIP
    try:
        sass = subprocess.run([args.cuobjdump, "-sass", "-arch", args.arch, args.library], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"check_select_compact: cannot read the SASS of {args.library}: {e}", file=sys.stderr)
        return 2
    ours = [(name, body) for name, body in functions(sass) if OUR_FILES.search(name)]
    failures, seen = [], set()
    for name, body in ours:
        for pattern, required in RULES:
            if not re.search(pattern, name):
                continue
            seen.add(pattern)
            local = sorted({m.group(0) for m in LOCAL.finditer(body)})
            if local:
                failures.append(f"{name}: local-memory traffic ({', '.join(local)})")
            for need in required:
                if not re.search(need, body):
                    failures.append(f"{name}: no instruction matching {need}")
            break
        else:
            failures.append(f"{name}: a kernel of select/compact/retention with no rule (add one to RULES)")
    for pattern, _ in RULES:
        if pattern not in seen:
            failures.append(f"no {args.arch} kernel matches {pattern!r}: renamed, or not built for {args.arch}?")
    for line in failures:
        print(line)
    print(f"check_select_compact: {len(ours)} kernels, {len(failures)} violations")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
