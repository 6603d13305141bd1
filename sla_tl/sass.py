"""Facts read from a kernel's SASS (the text `cuobjdump -sass` prints for a cubin).

What the static gate needs to know about a Hopper kernel, beyond ptxas's resource report:
whether the tensor cores are used (HGMMA), the register split of a warp-specialised kernel
(USETMAXREG), whether anything lives in local memory (LDL/STL), and, in the main loop, how
long it is and whether the softmax's exponentials (MUFU.EX2) run while wgmma groups are
still in flight.

The main loop is found from the branches, with no help from the compiler:

- a *loop* is a backward branch: a BRA at address `a` whose target `t <= a`; its body is every
  instruction from `t` to the last backward branch to `t` (several branches back to one
  target, `continue`s, are one loop);
- only branches up to the function's last EXIT count: ptxas puts out-of-line code after it
  (the retry paths of mbarrier waits, which jump back into the loop they came from, and
  subroutines), and those jumps are not loops;
- the *main loop* is an innermost loop containing HGMMA (no smaller loop with HGMMA lies
  inside it); where there are several, the one with the most HGMMA instructions, then the
  longest. Its instruction count is `loop_instructions`.

A wgmma wait `WARPGROUP.DEPBAR.LE gsb0, N` with N >= 1 lets the warpgroup go on while N
groups are still on the tensor cores. Walking the loop body from such a wait (around the
back edge if need be) up to the next `WARPGROUP.DEPBAR.LE gsb0, 0x0`, the exponentials met
on the way overlap a GEMM: `groups_in_flight` is the largest such N followed by at least
one MUFU.EX2, and `overlapped_exp2` the most MUFU.EX2 after one such wait.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# "/*0c50*/   @!P0 HGMMA.64x64x16.F32.BF16 R24, R148, gdesc[UR12], RZ ;   /* 0x00e0... */"
_INSTRUCTION = re.compile(
    r"^\s*/\*(?P<address>[0-9a-fA-F]+)\*/\s+"
    r"(?:(?P<predicate>@!?U?P(?:[0-9]+|T))\s+)?"
    r"(?P<opcode>[A-Z][A-Za-z0-9_.]*)\s*(?P<operands>[^;]*?)\s*;"
)
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$", re.MULTILINE)
_HEX = re.compile(r"0x[0-9a-fA-F]+")


class Instruction(NamedTuple):
    """One SASS instruction: its address, guard predicate ("" when none), opcode with its
    modifiers ("HGMMA.64x64x16.F32.BF16") and operand text."""

    address: int
    predicate: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers ("HGMMA", "LDL", "BRA")."""
        return self.opcode.split(".", 1)[0]


def function_text(sass: str, name: str = "main_kernel") -> str:
    """The part of `sass` that disassembles function `name`; ValueError if it is absent."""
    headers = list(_FUNCTION.finditer(sass))
    for index, header in enumerate(headers):
        if header.group(1) == name:
            end = headers[index + 1].start() if index + 1 < len(headers) else len(sass)
            return sass[header.end():end]
    found = ", ".join(h.group(1) for h in headers) or "none"
    raise ValueError(f"no function {name} in the SASS (functions: {found})")


def parse(text: str) -> list[Instruction]:
    """The instructions of a SASS listing, in address order (encoding-only lines skipped)."""
    instructions = []
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            instructions.append(Instruction(int(match["address"], 16), match["predicate"] or "",
                                            match["opcode"], match["operands"]))
    return sorted(instructions)


def _branch_target(instruction: Instruction) -> int | None:
    """The address a direct branch jumps to (its last hexadecimal operand)."""
    if instruction.base != "BRA":
        return None
    targets = _HEX.findall(instruction.operands)
    return int(targets[-1], 16) if targets else None


def loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) address of every loop, as the module docstring defines one."""
    exits = [x.address for x in instructions if x.base == "EXIT"]
    end = exits[-1] if exits else instructions[-1].address if instructions else -1
    last_branch: dict[int, int] = {}
    for x in instructions:
        target = _branch_target(x)
        if target is not None and target <= x.address <= end:
            last_branch[target] = max(last_branch.get(target, x.address), x.address)
    return sorted(last_branch.items())


def _body(instructions: list[Instruction], loop: tuple[int, int]) -> list[Instruction]:
    first, last = loop
    return [x for x in instructions if first <= x.address <= last]


def main_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the main loop (see the module docstring); empty if no loop has HGMMA."""
    bodies = [(loop, _body(instructions, loop)) for loop in loops(instructions)]
    with_hgmma = [(loop, body) for loop, body in bodies if uses_hgmma(body)]

    def inside(inner: tuple[int, int], outer: tuple[int, int]) -> bool:
        return inner != outer and outer[0] <= inner[0] and inner[1] <= outer[1]

    innermost = [(loop, body) for loop, body in with_hgmma
                 if not any(inside(other, loop) for other, _ in with_hgmma)]
    if not innermost:
        return []
    return max(innermost, key=lambda lb: (sum(x.base == "HGMMA" for x in lb[1]), len(lb[1])))[1]


def _wgmma_wait(instruction: Instruction) -> int | None:
    """N of `WARPGROUP.DEPBAR.LE gsb0, N` (groups allowed to stay in flight), else None."""
    if instruction.opcode != "WARPGROUP.DEPBAR.LE":
        return None
    operands = [o.strip() for o in instruction.operands.split(",")]
    if len(operands) != 2 or operands[0] != "gsb0":
        return None
    return int(operands[1], 0)


def overlap(body: list[Instruction]) -> tuple[int, int]:
    """(groups_in_flight, overlapped_exp2) of a loop body (see the module docstring)."""
    groups, most = 0, 0
    for start, instruction in enumerate(body):
        waiting = _wgmma_wait(instruction)
        if not waiting:
            continue
        exp2 = 0
        for step in range(1, len(body)):  # around the back edge, at most once
            following = body[(start + step) % len(body)]
            if _wgmma_wait(following) == 0:
                break
            exp2 += following.opcode == "MUFU.EX2"
        if exp2:
            groups, most = max(groups, waiting), max(most, exp2)
    return groups, most


def setmaxnreg(instructions: list[Instruction]) -> tuple[int, ...]:
    """The register counts USETMAXREG asks for, distinct, highest first."""
    counts = {int(_HEX.findall(x.operands)[-1], 16) for x in instructions
              if x.base == "USETMAXREG" and _HEX.search(x.operands)}
    return tuple(sorted(counts, reverse=True))


def uses_hgmma(instructions: list[Instruction]) -> bool:
    """Whether any instruction is a Hopper tensor-core GEMM (HGMMA)."""
    return any(x.base == "HGMMA" for x in instructions)


def local_memory_ops(instructions: list[Instruction]) -> int:
    """How many instructions load or store local memory (LDL, STL): spills, or arrays
    ptxas could not keep in registers."""
    return sum(x.base in ("LDL", "STL") for x in instructions)
