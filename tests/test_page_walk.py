"""The guest page-table walk against tables built by a separate writer (no /dev/kvm needed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.memory.page_walk import (
    CR0_PG,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    EFER_NXE,
    PageWalkError,
    PagingContext,
    PagingMode,
    paging_mode,
    walk,
)
from kvmpy.testing.page_tables import PageTableBuilder

TABLES = 0x10_0000  # page tables live in [1 MiB, 5 MiB)
TABLES_SIZE = 0x40_0000
RAM_SIZE = 0x80_0000  # 8 MiB of fake guest RAM at GPA 0
NX = 1 << 63


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.anonymous([(0, RAM_SIZE)])
    yield ram
    ram.close()


def context(builder: PageTableBuilder, **options: object) -> PagingContext:
    return PagingContext(builder.mode, builder.cr3, **options)  # type: ignore[arg-type]


def canonical(address: int, width: int) -> int:
    """Sign-extend a ``width``-bit address to 64 bits, as long-mode addresses must be."""
    address &= (1 << width) - 1
    if address >> (width - 1):
        address |= ((1 << 64) - 1) ^ ((1 << width) - 1)
    return address


# --- the mode from the registers ------------------------------------------------------
def test_paging_mode_follows_cr0_cr4_and_efer() -> None:
    assert paging_mode(0, CR4_PAE, EFER_LMA) is PagingMode.OFF
    assert paging_mode(CR0_PG, 0, 0) is PagingMode.BITS32
    assert paging_mode(CR0_PG, CR4_PAE, 0) is PagingMode.PAE
    assert paging_mode(CR0_PG, CR4_PAE, EFER_LMA) is PagingMode.LEVEL4
    assert paging_mode(CR0_PG, CR4_PAE | CR4_LA57, EFER_LMA) is PagingMode.LEVEL5
    ctx = PagingContext.from_registers(CR0_PG, 0x5000, CR4_PAE | CR4_PSE, EFER_LMA | EFER_NXE, 46)
    assert (ctx.mode, ctx.cr3, ctx.nx_enabled, ctx.pse, ctx.max_phys_bits) == (
        PagingMode.LEVEL4,
        0x5000,
        True,
        True,
        46,
    )


def test_paging_off_is_the_identity(memory: GuestMemory) -> None:
    result = walk(memory, 0x1234_5678, PagingContext(PagingMode.OFF, 0))
    assert result.gpa == 0x1234_5678 and result.steps == ()
    assert not walk(memory, 1 << 32, PagingContext(PagingMode.OFF, 0)).ok


# --- translations against the model: what the builder mapped ------------------------------
PAGE_SIZES = {
    PagingMode.LEVEL5: (1 << 12, 1 << 21, 1 << 30),
    PagingMode.LEVEL4: (1 << 12, 1 << 21, 1 << 30),
    PagingMode.PAE: (1 << 12, 1 << 21),
    PagingMode.BITS32: (1 << 12, 1 << 22),
}
ADDRESS_BITS = {PagingMode.LEVEL5: 57, PagingMode.LEVEL4: 48, PagingMode.PAE: 32, PagingMode.BITS32: 32}
PHYSICAL_BITS = {PagingMode.LEVEL5: 46, PagingMode.LEVEL4: 46, PagingMode.PAE: 36, PagingMode.BITS32: 32}


@st.composite
def address_spaces(draw: st.DrawFn) -> tuple[PagingMode, list[tuple[int, int, int, int]]]:
    """A mode and non-overlapping mappings (gva, gpa, page size, leaf flags) in it."""
    mode = draw(st.sampled_from(list(PAGE_SIZES)))
    width = ADDRESS_BITS[mode]
    mappings: list[tuple[int, int, int, int]] = []
    for _ in range(draw(st.integers(1, 12))):
        size = draw(st.sampled_from(PAGE_SIZES[mode]))
        gva = draw(st.integers(0, (1 << width) - 1)) & ~(size - 1)
        gpa = draw(st.integers(0, (1 << PHYSICAL_BITS[mode]) - 1)) & ~(size - 1)
        rw_us = draw(st.sampled_from([0, 0x2, 0x4, 0x6]))
        nx = (
            NX
            if mode in (PagingMode.LEVEL4, PagingMode.LEVEL5, PagingMode.PAE) and draw(st.booleans())
            else 0
        )
        if any(gva < other + other_size and other < gva + size for other, _, other_size, _ in mappings):
            continue
        mappings.append((gva, gpa, size, 0x1 | rw_us | nx))
    return mode, mappings


@settings(max_examples=150, deadline=None)
@given(space=address_spaces(), offsets=st.lists(st.integers(0, (1 << 30) - 1), min_size=1, max_size=3))
def test_walk_finds_what_was_mapped(
    space: tuple[PagingMode, list[tuple[int, int, int, int]]], offsets: list[int]
) -> None:
    mode, mappings = space
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    try:
        builder = PageTableBuilder(memory, mode, TABLES, TABLES_SIZE)
        for gva, gpa, size, flags in mappings:
            builder.map(gva, gpa, size, flags)
        ctx = context(builder, nx_enabled=True, pse=True, max_phys_bits=PHYSICAL_BITS[mode])
        width = ADDRESS_BITS[mode]
        for gva, gpa, size, flags in mappings:
            for offset in offsets:
                address = gva + offset % size
                if width > 32:
                    address = canonical(address, width)
                result = walk(memory, address, ctx)
                assert result.fault is None, result.fault
                assert result.gpa == gpa + offset % size
                assert result.page_size == size
                assert result.writable == bool(flags & 0x2)
                assert result.user == bool(flags & 0x4)
                assert result.executable == (not flags & NX)
                assert result.steps[-1].entry & 0x1
                assert len(result.steps) <= len(PAGE_SIZES[mode]) + 2
    finally:
        memory.close()


@settings(max_examples=60, deadline=None)
@given(space=address_spaces(), probe=st.integers(0, (1 << 57) - 1))
def test_an_unmapped_address_is_not_present_where_the_model_has_nothing(
    space: tuple[PagingMode, list[tuple[int, int, int, int]]], probe: int
) -> None:
    mode, mappings = space
    width = ADDRESS_BITS[mode]
    probe &= (1 << width) - 1
    if any(gva <= probe < gva + size for gva, _, size, _ in mappings):
        return
    memory = GuestMemory.anonymous([(0, RAM_SIZE)])
    try:
        builder = PageTableBuilder(memory, mode, TABLES, TABLES_SIZE)
        for gva, gpa, size, flags in mappings:
            builder.map(gva, gpa, size, flags)
        address = canonical(probe, width) if width > 32 else probe
        result = walk(memory, address, context(builder, nx_enabled=True, pse=True))
        assert result.gpa is None
        assert result.fault is not None and result.fault.startswith("not present at level")
        assert result.steps[-1].maps == "not present"
    finally:
        memory.close()


def test_marker_bytes_are_found_through_the_walk(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    gva = 0xFFFF_8000_0020_1000
    builder.map(gva, 0x60_0000, 1 << 12)
    memory.write(0x60_0123, b"kvmpy marker")
    gpa = walk(memory, gva + 0x123, context(builder)).require()
    assert memory.read(gpa, 12) == b"kvmpy marker"


# --- each level as the monitor shows it --------------------------------------------------
def test_steps_record_tables_indices_entries_and_flags(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    gva = canonical((3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0xABC, 48)
    builder.map(gva, 0x7000, 1 << 12, flags=0x1 | 0x2 | 0x20 | 0x40 | 0x100 | (5 << 59))
    result = walk(memory, gva, context(builder, nx_enabled=True))
    assert [s.table_name for s in result.steps] == ["PML4", "PDPT", "PD", "PT"]
    assert [s.index for s in result.steps] == [3, 5, 7, 9]
    assert [s.level for s in result.steps] == [4, 3, 2, 1]
    assert result.steps[0].table == builder.cr3
    for depth, step in enumerate(result.steps):
        assert step.entry_address == builder.entry_address(gva, depth)
        assert step.entry == memory.read_u64(step.entry_address)
    assert [s.maps for s in result.steps] == ["table", "table", "table", "4 KiB page"]
    assert result.steps[0].flags == ("P", "RW", "US")
    assert result.steps[-1].flags == ("P", "RW", "A", "D", "G")
    assert result.steps[-1].protection_key == 5
    assert result.gpa == 0x7ABC and not result.user


def test_large_pages_stop_the_walk_early(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x4000_0000, 0x1_4000_0000, 1 << 30)
    builder.map(0x20_0000, 0x40_0000, 1 << 21)
    gib = walk(memory, 0x4000_0000 + 0x1234_5678, context(builder))
    mib = walk(memory, 0x20_0000 + 0x1_2345, context(builder))
    assert (gib.gpa, gib.page_size, [s.maps for s in gib.steps]) == (
        0x1_4000_0000 + 0x1234_5678,
        1 << 30,
        ["table", "1 GiB page"],
    )
    assert (mib.gpa, len(mib.steps), mib.steps[-1].flags) == (0x40_0000 + 0x1_2345, 3, ("P", "RW", "PS"))


def test_five_level_paging_has_a_pml5(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL5, TABLES, TABLES_SIZE)
    gva = canonical(0x1FF << 48 | 0x1000, 57)
    builder.map(gva, 0x9000, 1 << 12)
    result = walk(memory, gva, context(builder))
    assert result.gpa == 0x9000
    assert [s.table_name for s in result.steps] == ["PML5", "PML4", "PDPT", "PD", "PT"]
    assert result.steps[0].index == 0x1FF


def test_32_bit_paging_without_pse_ignores_ps(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.BITS32, TABLES, TABLES_SIZE)
    builder.map(0x80_0000, 0x40_0000, 1 << 22)
    with_pse = walk(memory, 0x80_1234, context(builder, pse=True))
    assert with_pse.gpa == 0x40_1234 and with_pse.steps[0].maps == "4 MiB page"
    without_pse = walk(memory, 0x80_1234, context(builder, pse=False))
    assert without_pse.steps[0].maps == "table"  # PS ignored: 0x40_0000 is read as a page table
    assert without_pse.steps[1].table == 0x40_0000


# --- where walks stop, and why ----------------------------------------------------------
def test_not_present_names_the_level(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x40_0000, 0x1000, 1 << 12)
    memory.write_u64(builder.entry_address(0x40_0000, 2), 0)  # clear the PD entry
    result = walk(memory, 0x40_0000, context(builder))
    assert result.fault == "not present at level 2 (PD[2])"
    assert len(result.steps) == 3
    with pytest.raises(PageWalkError, match="not present at level 2"):
        result.require()


def test_reserved_physical_address_bits_fault(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x1000, 0x2000, 1 << 12)
    leaf = builder.entry_address(0x1000, 3)
    memory.write_u64(leaf, memory.read_u64(leaf) | 1 << 47)
    assert walk(memory, 0x1000, context(builder, max_phys_bits=52)).gpa == (1 << 47) | 0x2000
    narrow = walk(memory, 0x1000, context(builder, max_phys_bits=46))
    assert narrow.fault is not None and narrow.fault.startswith("reserved bits 0x800000000000 set at level 1")


def test_nx_is_reserved_without_efer_nxe(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x1000, 0x2000, 1 << 12, flags=0x3 | NX)
    assert walk(memory, 0x1000, context(builder, nx_enabled=True)).executable is False
    assert "reserved bits 0x8000000000000000" in str(walk(memory, 0x1000, context(builder)).fault)


def test_ps_in_a_pml4_entry_and_stray_large_page_bits_are_reserved(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x20_0000, 0x40_0000, 1 << 21)
    pde = builder.entry_address(0x20_0000, 2)
    memory.write_u64(pde, memory.read_u64(pde) | 1 << 13)
    assert "reserved bits 0x2000 set at level 2" in str(walk(memory, 0x20_0000, context(builder)).fault)
    pml4e = builder.entry_address(0x20_0000, 0)
    memory.write_u64(pml4e, memory.read_u64(pml4e) | 0x80)
    assert "reserved bits 0x80 set at level 4" in str(walk(memory, 0x20_0000, context(builder)).fault)


def test_a_table_outside_ram_stops_the_walk(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x1000, 0x2000, 1 << 12)
    memory.write_u64(builder.entry_address(0x1000, 1), 0xFEE0_0000 | 0x7)  # PDPTE -> the LAPIC page
    result = walk(memory, 0x1000, context(builder))
    assert result.fault == "level 2 (PD) table at GPA 0xfee00000 is outside guest RAM"
    assert len(result.steps) == 2
    outside = walk(memory, 0x1000, PagingContext(PagingMode.LEVEL4, RAM_SIZE))
    assert outside.fault == f"level 4 (PML4) table at GPA {RAM_SIZE:#x} is outside guest RAM"


def test_non_canonical_addresses_are_refused_before_any_read(memory: GuestMemory) -> None:
    result = walk(memory, 0x0000_8000_0000_0000, PagingContext(PagingMode.LEVEL4, TABLES))
    assert result.steps == () and "not canonical for 4-level paging" in str(result.fault)
    assert walk(memory, 0x0000_8000_0000_0000, PagingContext(PagingMode.LEVEL5, TABLES)).fault != (
        result.fault
    )
    assert "32 bits" in str(walk(memory, 1 << 32, PagingContext(PagingMode.PAE, TABLES)).fault)


def test_pae_pdpte_with_rw_set_is_reserved(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.PAE, TABLES, TABLES_SIZE)
    builder.map(0xC000_0000, 0x3000, 1 << 12)
    assert walk(memory, 0xC000_0000, context(builder)).gpa == 0x3000
    pdpte = builder.entry_address(0xC000_0000, 0)
    memory.write_u64(pdpte, memory.read_u64(pdpte) | 0x2)
    assert "reserved bits 0x2 set at level 3 (PDPT[3]" in str(
        walk(memory, 0xC000_0000, context(builder)).fault
    )


def test_a_read_only_table_entry_makes_the_page_read_only(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x1000, 0x2000, 1 << 12, flags=0x7, table_flags=0x5)
    result = walk(memory, 0x1000, context(builder))
    assert result.ok and not result.writable and result.user


def test_without_1_gib_pages_ps_in_a_pdpt_entry_is_reserved(memory: GuestMemory) -> None:
    builder = PageTableBuilder(memory, PagingMode.LEVEL4, TABLES, TABLES_SIZE)
    builder.map(0x4000_0000, 0, 1 << 30)
    assert walk(memory, 0x4000_0123, context(builder)).gpa == 0x123
    result = walk(memory, 0x4000_0123, context(builder, gib_pages=False))
    assert result.fault == f"reserved bits 0x80 set at level 3 (PDPT[1] = {result.steps[-1].entry:#x})"
