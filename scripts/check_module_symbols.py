"""Checks that a shared object built as one of wavg_ext's modules is self-contained: no
symbol of wavg_ext's own code is left undefined (the module must load without the
others; csrc/cuda/shared_host.cpp compiles the shared host code into _C_cuda), and the
Python module init it needs is defined. Used by CMake's cuda_compile_check, which links
_C_cuda's nvcc-compiled objects on machines whose torch has no CUDA libraries to link.

    python scripts/check_module_symbols.py LIB.so --module _C_cuda
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def symbols(path: str, which: str) -> list:
    out = subprocess.run(["nm", "-D", "-C", which, path], capture_output=True, text=True, check=True)
    # "<address> <type> <name>" or, undefined, "<spaces><type> <name>"; demangled names hold spaces.
    return [line.strip().split(None, 1)[1] if line[:1] == " " else line.split(None, 2)[2]
            for line in out.stdout.splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library")
    p.add_argument("--module", required=True, help="the Python module it must define (PyInit_<module>)")
    args = p.parse_args(argv)
    undefined = [s for s in symbols(args.library, "--undefined-only") if "wavg_ext::" in s]
    defined = symbols(args.library, "--defined-only")
    problems = [f"undefined: {s}" for s in sorted(set(undefined))]
    if f"PyInit_{args.module}" not in defined:
        problems.append(f"PyInit_{args.module} is not defined")
    if problems:
        print(f"{args.library} is not a self-contained {args.module}:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"{args.library}: {args.module} is self-contained ({len(defined)} symbols defined)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
