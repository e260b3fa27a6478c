#!/usr/bin/env python3
"""Generate src/kvmpy/abi/kvm_generated.py from the kernel's KVM UAPI headers.

The kernel headers are the source of truth for the KVM ABI. This script
preprocesses <linux/kvm.h> (which pulls in <asm/kvm.h>) with gcc, parses it
with pycparser and emits:

* a ctypes class for every struct and union, named as in C; anonymous
  members become ``_u0``/``_s0`` listed in ``_anonymous_`` so that C-style
  access (``run.io.port``) works;
* every integer-valued ``KVM_*`` macro (ioctl numbers included), evaluated by
  compiling a small C program;
* ``LAYOUT``: sizeof and field offsets of every struct as the compiler lays
  them out, which tests/test_abi.py compares with ctypes.

Usage: python tools/gen_kvm_abi.py [--check] [--out PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pycparser import c_ast, c_parser

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "src" / "kvmpy" / "abi" / "kvm_generated.py"
HEADERS = ["linux/kvm.h"]
MACRO_PREFIXES = ("KVM_", "KVMIO")

PREPROCESS_DEFINES = [
    "-D__attribute__(x)=",
    "-D__extension__=",
    "-D__signed__=signed",
    "-D__inline__=",
    "-D__inline=",
    "-D__restrict=",
    "-D__asm__(x)=",
]

BASE_TYPES = {
    "char": "ctypes.c_char",
    "signed char": "ctypes.c_int8",
    "unsigned char": "ctypes.c_uint8",
    "short": "ctypes.c_int16",
    "short int": "ctypes.c_int16",
    "signed short": "ctypes.c_int16",
    "unsigned short": "ctypes.c_uint16",
    "unsigned short int": "ctypes.c_uint16",
    "int": "ctypes.c_int32",
    "signed int": "ctypes.c_int32",
    "signed": "ctypes.c_int32",
    "unsigned int": "ctypes.c_uint32",
    "unsigned": "ctypes.c_uint32",
    "long": "ctypes.c_int64",
    "long int": "ctypes.c_int64",
    "signed long": "ctypes.c_int64",
    "unsigned long": "ctypes.c_uint64",
    "unsigned long int": "ctypes.c_uint64",
    "long long": "ctypes.c_int64",
    "long long int": "ctypes.c_int64",
    "signed long long": "ctypes.c_int64",
    "unsigned long long": "ctypes.c_uint64",
    "unsigned long long int": "ctypes.c_uint64",
    "_Bool": "ctypes.c_bool",
    "float": "ctypes.c_float",
    "double": "ctypes.c_double",
}


@dataclass
class Record:
    """A struct or union to emit."""

    kind: str  # "struct" or "union"
    name: str  # Python class name
    c_name: str | None  # "struct kvm_regs" when it has a C tag, else None
    fields: list[tuple[str, str, int | None]] = field(default_factory=list)  # name, type expr, bits
    anonymous: list[str] = field(default_factory=list)
    deps: set[str] = field(default_factory=set)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def include_lines() -> str:
    return "".join(f"#include <{h}>\n" for h in HEADERS)


def preprocess() -> str:
    done = run(["gcc", "-E", "-P", *PREPROCESS_DEFINES, "-x", "c", "-"], input=include_lines())
    if done.returncode:
        sys.exit(f"gen_kvm_abi: gcc -E failed:\n{done.stderr}")
    return done.stdout


class Emitter:
    """Walks pycparser's AST and collects records in dependency order."""

    def __init__(self, ast: c_ast.FileAST) -> None:
        self.typedefs: dict[str, c_ast.Node] = {}
        self.records: dict[str, Record] = {}
        self.tags: dict[tuple[str, str], str] = {}  # (kind, tag) -> class name
        for ext in ast.ext:
            if isinstance(ext, c_ast.Typedef):
                self.typedefs[ext.name] = ext.type
        for ext in ast.ext:
            node = ext.type if isinstance(ext, (c_ast.Decl, c_ast.Typedef)) else None
            if isinstance(node, (c_ast.Struct, c_ast.Union)) and node.decls is not None:
                self.record(node, node.name)
            elif (
                isinstance(node, c_ast.TypeDecl)
                and isinstance(node.type, (c_ast.Struct, c_ast.Union))
                and node.type.decls is not None
            ):
                self.record(node.type, node.type.name or ext.name)

    def record(self, node: c_ast.Struct | c_ast.Union, name: str) -> str:
        kind = "struct" if isinstance(node, c_ast.Struct) else "union"
        if node.name and (kind, node.name) in self.tags and node.decls is None:
            return self.tags[(kind, node.name)]
        if name in self.records:
            return name
        record = Record(kind, name, f"{kind} {node.name}" if node.name else None)
        self.records[name] = record
        if node.name:
            self.tags[(kind, node.name)] = name
        anon = 0
        for decl in node.decls or []:
            if decl.name is None:  # anonymous struct/union member
                inner = decl.type
                member = f"_{'u' if isinstance(inner, c_ast.Union) else 's'}{anon}"
                anon += 1
                inner_name = self.record(inner, f"{name}_{member}")
                record.fields.append((member, inner_name, None))
                record.anonymous.append(member)
                record.deps.add(inner_name)
                continue
            type_expr = self.type_expr(decl.type, f"{name}_{decl.name}", record)
            bits = int(self.evaluate(decl.bitsize)) if decl.bitsize is not None else None
            record.fields.append((decl.name, type_expr, bits))
        return name

    def type_expr(self, node: c_ast.Node, inline_name: str, owner: Record) -> str:
        if isinstance(node, c_ast.ArrayDecl):
            inner = self.type_expr(node.type, inline_name, owner)
            size = 0 if node.dim is None else int(self.evaluate(node.dim))
            return f"({inner} * {size})"
        if isinstance(node, c_ast.PtrDecl):
            return "ctypes.c_void_p"
        if isinstance(node, c_ast.TypeDecl):
            return self.type_expr(node.type, inline_name, owner)
        if isinstance(node, (c_ast.Struct, c_ast.Union)):
            kind = "struct" if isinstance(node, c_ast.Struct) else "union"
            if node.decls is not None:
                name = self.record(node, node.name or inline_name)
            else:
                name = self.tags.get((kind, node.name), node.name)
            owner.deps.add(name)
            return name
        if isinstance(node, c_ast.Enum):
            return "ctypes.c_uint32"
        if isinstance(node, c_ast.IdentifierType):
            names = " ".join(node.names)
            if names in BASE_TYPES:
                return BASE_TYPES[names]
            if names in self.typedefs:
                return self.type_expr(self.typedefs[names], inline_name, owner)
            raise ValueError(f"unknown type {names}")
        raise ValueError(f"unsupported declarator {type(node).__name__}")

    def evaluate(self, node: c_ast.Node) -> int:
        if isinstance(node, c_ast.Constant):
            return int(node.value.rstrip("uUlL"), 0)
        if isinstance(node, c_ast.BinaryOp):
            left, right = self.evaluate(node.left), self.evaluate(node.right)
            ops = {
                "+": left + right,
                "-": left - right,
                "*": left * right,
                "<<": left << right,
                ">>": left >> right,
                "|": left | right,
                "&": left & right,
            }
            if node.op == "/":
                return left // right
            return ops[node.op]
        if isinstance(node, c_ast.UnaryOp) and node.op == "-":
            return -self.evaluate(node.expr)
        if isinstance(node, c_ast.UnaryOp) and node.op == "sizeof":
            type_expr = self.type_expr(node.expr.type, "_sizeof", Record("struct", "_", None))
            if not type_expr.startswith("ctypes."):
                raise ValueError(f"sizeof of a record in an array bound: {type_expr}")
            return ctypes.sizeof(getattr(ctypes, type_expr.removeprefix("ctypes.")))
        if isinstance(node, c_ast.Cast):
            return self.evaluate(node.expr)
        raise ValueError(f"cannot evaluate {type(node).__name__}")

    def ordered(self) -> list[Record]:
        done: set[str] = set()
        out: list[Record] = []

        def visit(name: str) -> None:
            if name in done or name not in self.records:
                return
            done.add(name)
            for dep in sorted(self.records[name].deps):
                visit(dep)
            out.append(self.records[name])

        for name in sorted(self.records):
            visit(name)
        return out


def collect_macros() -> list[str]:
    done = run(["gcc", "-E", "-dM", "-x", "c", "-"], input=include_lines())
    names = set()
    for line in done.stdout.splitlines():
        match = re.match(r"#define (\w+)(\(?)", line)
        if match and match.group(1).startswith(MACRO_PREFIXES) and not match.group(2):
            names.add(match.group(1))
    return sorted(names)


def compile_and_run(body_lines: list[str], prelude: str = "") -> tuple[list[str], set[int]]:
    """Compile a program printing one line per entry; returns output and failing line indexes."""
    header = include_lines() + "#include <stdio.h>\n#include <stddef.h>\n" + prelude + "int main(void) {\n"
    offset = header.count("\n") + 1
    source = header + "\n".join(body_lines) + "\nreturn 0;\n}\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file, exe = Path(tmp, "probe.c"), Path(tmp, "probe")
        c_file.write_text(source)
        built = run(["gcc", "-w", "-o", str(exe), str(c_file)])
        if built.returncode:
            bad = {int(m.group(1)) - offset for m in re.finditer(r"probe\.c:(\d+):\d+: error", built.stderr)}
            if not bad:
                sys.exit(f"gen_kvm_abi: probe failed to build:\n{built.stderr[:2000]}")
            return [], bad
        result = run([str(exe)])
        return result.stdout.splitlines(), set()


def probe(lines: list[str]) -> list[str]:
    """Drop the lines that do not compile, then run the rest."""
    lines = list(lines)
    while True:
        output, bad = compile_and_run(lines)
        if not bad:
            return output
        lines = [line for i, line in enumerate(lines) if i not in bad]


def macro_values(names: list[str]) -> dict[str, int]:
    lines = [f'printf("%s %lld\\n", "{n}", (long long)(({n}) + 0));' for n in names]
    values = {}
    for line in probe(lines):
        name, value = line.split()
        values[name] = int(value)
    return values


def layouts(records: list[Record]) -> dict[str, tuple[int, dict[str, int]]]:
    lines = []
    for record in records:
        if record.c_name is None:
            continue
        lines.append(f'printf("S {record.name} %zu\\n", sizeof({record.c_name}));')
        for fname in _visible_fields(record, {r.name: r for r in records}):
            lines.append(f'printf("F {record.name} {fname} %zu\\n", offsetof({record.c_name}, {fname}));')
    result: dict[str, tuple[int, dict[str, int]]] = {}
    for line in probe(lines):
        parts = line.split()
        if parts[0] == "S":
            result[parts[1]] = (int(parts[2]), {})
        else:
            result[parts[1]][1][parts[2]] = int(parts[3])
    return result


def _visible_fields(record: Record, by_name: dict[str, Record]) -> list[str]:
    """Named fields, including those reached through anonymous members (as in C)."""
    names = []
    for fname, type_expr, bits in record.fields:
        if bits is not None:
            continue
        if fname in record.anonymous:
            names += _visible_fields(by_name[type_expr], by_name)
        else:
            names.append(fname)
    return names


def render(
    records: list[Record], constants: dict[str, int], layout: dict[str, tuple[int, dict[str, int]]]
) -> str:
    out = [
        "# Generated by tools/gen_kvm_abi.py from " + ", ".join(f"<{h}>" for h in HEADERS) + "; do not edit.",
        "# ruff: noqa",
        "# mypy: ignore-errors",
        '"""ctypes mirrors of the KVM UAPI structs and constants (generated)."""',
        "",
        "import ctypes",
        "",
    ]
    for name in sorted(constants):
        out.append(f"{name} = {constants[name]}")
    out.append("")
    for record in records:
        base = "ctypes.Structure" if record.kind == "struct" else "ctypes.Union"
        out.append("")
        out.append(f"class {record.name}({base}):")
        if record.anonymous:
            out.append(f"    _anonymous_ = {tuple(record.anonymous)!r}")
        out.append("    _fields_ = [")
        for fname, type_expr, bits in record.fields:
            if bits is None:
                out.append(f"        ({fname!r}, {type_expr}),")
            else:
                out.append(f"        ({fname!r}, {type_expr}, {bits}),")
        out.append("    ]")
        out.append("")
    out.append("")
    out.append("#: Compiler layout of every struct: name -> (sizeof, {field: offsetof}).")
    out.append("LAYOUT = {")
    for name in sorted(layout):
        size, offsets = layout[name]
        fields = ", ".join(f"{k!r}: {v}" for k, v in sorted(offsets.items()))
        out.append(f"    {name!r}: ({size}, {{{fields}}}),")
    out.append("}")
    return "\n".join(out) + "\n"


def generate() -> str:
    ast = c_parser.CParser().parse(preprocess(), filename="<kvm.h>")
    records = Emitter(ast).ordered()
    constants = macro_values(collect_macros())
    return render(records, constants, layouts(records))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--check", action="store_true", help="fail if --out differs from what would be generated"
    )
    args = parser.parse_args()
    text = generate()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run tools/gen_kvm_abi.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
