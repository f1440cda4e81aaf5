namespace ActorVmm.Memory;

/// <summary>The page-table format a pmap's entries follow (FreeBSD's PT_X86 / PT_EPT).</summary>
public enum PmapType { X86, Ept }

/// <summary>
/// What the backing of a pmap supports (FreeBSD's <c>pm_flags</c>): superpages, accessed/dirty
/// bits kept by hardware, accessed/dirty bits emulated by faults (here: userfaultfd MINOR and WP).
/// </summary>
public sealed record PmapFlags(bool Superpages, bool HardwareAccessedDirty, bool EmulateAccessedDirty)
{
    /// <summary>A vmspace with userfaultfd: A/D emulated by MINOR/WP faults on 4 KiB pages.</summary>
    public static readonly PmapFlags UffdEmulated = new(Superpages: false, HardwareAccessedDirty: false, EmulateAccessedDirty: true);

    /// <summary>No fault tracking: residency from the memfd, A/D unknown (reported set when resident).</summary>
    public static readonly PmapFlags Untracked = new(Superpages: false, HardwareAccessedDirty: false, EmulateAccessedDirty: false);
}

/// <summary>
/// The bit layout of one pmap entry, computed at run time from the type and flags — the seed's
/// "PG_M ... becomes a local variable initialized at runtime" (FreeBSD amd64 pmap.c
/// <c>pmap_valid_bit()</c>, <c>pmap_rw_bit()</c>, <c>pmap_accessed_bit()</c>, <c>pmap_modified_bit()</c>).
/// <list type="bullet">
/// <item>X86: P 0, RW 1, U 2, A 5, D 6, PS 7; software: wired (held) 9 = PG_W, swapped 10.</item>
/// <item>EPT, hardware A/D: read 0 = valid, write 1 = RW, execute 2, page size 7, accessed 8, dirty 9.</item>
/// <item>EPT with A/D emulation: valid = software bit 52 (EPT_PG_EMUL_V), RW = software bit 53
///   (EPT_PG_EMUL_RW: the mapping may be written), accessed = hardware read 0 (EPT_PG_RD), modified =
///   hardware write 1 (EPT_PG_WR); execute 2 follows accessed. An emulated mapping with A clear has no
///   hardware permission at all, so any access faults (here: the guest-view PTE is gone and the
///   next touch is a userfaultfd MINOR fault); with M clear, the next write faults (uffd WP).</item>
/// <item>EPT, both modes: software held 54, swapped 55 (bits 52–62 are ignored by the hardware).</item>
/// </list>
/// PS (bit 7 in both layouts, FreeBSD's PG_PS = EPT_PG_PS) is set on every entry of a 2 MiB-aligned
/// run the host maps with one 2 MiB page (a transparent huge page mapped by a PMD), where the
/// hardware would have a single PDE with PS: the run is superpage-backed.
/// The frame field (bits 12–51) holds the memfd offset of a resident page, or the swap-file
/// offset of a swapped one.
/// </summary>
public readonly record struct PmapBits(
    PmapType Type, ulong Valid, ulong ReadWrite, ulong User, ulong Execute, ulong Accessed, ulong Modified,
    ulong Held, ulong Swapped, ulong Superpage)
{
    public const ulong FrameMask = 0x000F_FFFF_FFFF_F000;

    // x86 PTE (Intel SDM Vol 3A §4.5, table 4-19; PS from the PDE, table 4-18).
    public const int X86_P = 0, X86_RW = 1, X86_U = 2, X86_A = 5, X86_D = 6, X86_PS = 7, X86_W = 9, X86_SWAPPED = 10;
    // EPT PTE (Intel SDM Vol 3C §29.3.2 / §29.3.5; PS from the EPT PDE, table 29-5).
    public const int EPT_R = 0, EPT_W = 1, EPT_X = 2, EPT_PS = 7, EPT_A = 8, EPT_D = 9;
    public const int EPT_EMUL_V = 52, EPT_EMUL_RW = 53, EPT_HELD = 54, EPT_SWAPPED = 55;

    public static PmapBits For(PmapType type, PmapFlags flags)
    {
        switch (type)
        {
            case PmapType.X86:
                // x86 page tables always have A/D in hardware; emulation only changes who sets them.
                return new(type, Valid: Bit(X86_P), ReadWrite: Bit(X86_RW), User: Bit(X86_U), Execute: 0,
                    Accessed: Bit(X86_A), Modified: Bit(X86_D), Held: Bit(X86_W), Swapped: Bit(X86_SWAPPED), Superpage: Bit(X86_PS));
            case PmapType.Ept:
                return flags.EmulateAccessedDirty
                    ? new(type, Valid: Bit(EPT_EMUL_V), ReadWrite: Bit(EPT_EMUL_RW), User: 0, Execute: Bit(EPT_X),
                        Accessed: Bit(EPT_R), Modified: Bit(EPT_W), Held: Bit(EPT_HELD), Swapped: Bit(EPT_SWAPPED), Superpage: Bit(EPT_PS))
                    : new(type, Valid: Bit(EPT_R), ReadWrite: Bit(EPT_W), User: 0, Execute: Bit(EPT_X),
                        Accessed: Bit(EPT_A), Modified: Bit(EPT_D), Held: Bit(EPT_HELD), Swapped: Bit(EPT_SWAPPED), Superpage: Bit(EPT_PS));
            default:
                throw new ArgumentOutOfRangeException(nameof(type), type, "unknown pmap type");
        }
    }

    private static ulong Bit(int n) => 1UL << n;
}

/// <summary>Per-page accessed/dirty, as <c>ScanAccessedDirty</c> reports them.</summary>
[Flags]
public enum PageAD : byte { None = 0, Accessed = 1, Dirty = 2 }

/// <summary>
/// One 64-bit entry per guest RAM page, in the layout of <see cref="Bits"/>. The vmspace keeps each
/// entry equal to the real state of the page: valid = the page has contents in the memfd; accessed =
/// the guest view maps it (the guest can touch it without a fault); modified = the guest may write
/// it without a fault (not write-protected) — with emulation that means written since the last
/// clear; swapped = its contents are in the swap file (frame = swap offset), held = a
/// <c>GpaHold</c> pins it; superpage = the host maps its 2 MiB run with one huge page.
/// Counts of the entries with each of valid, swapped, accessed, modified and superpage are kept
/// as the entries change. Not thread-safe: the vmspace actor owns it.
/// </summary>
public sealed class Pmap
{
    /// <summary>Pages in one superpage (2 MiB / 4 KiB).</summary>
    public const ulong SuperpagePages = 512;

    private readonly ulong[] _entries;

    public PmapType Type { get; }
    public PmapFlags Flags { get; }
    public PmapBits Bits { get; }
    public ulong Pages => (ulong)_entries.Length;

    /// <summary>Pages with the valid bit set.</summary>
    public ulong ResidentPages { get; private set; }

    public ulong SwappedPages { get; private set; }

    /// <summary>Entries with A set (mapped in the guest view since the last clear).</summary>
    public ulong AccessedPages { get; private set; }

    /// <summary>Entries with M set (written since the last clear; swapped pages keep it).</summary>
    public ulong DirtyPages { get; private set; }

    /// <summary>Entries in a superpage-backed run.</summary>
    public ulong SuperpageBackedPages { get; private set; }

    /// <summary>The most pages ever resident at once.</summary>
    public ulong PeakResidentPages { get; private set; }

    public Pmap(PmapType type, PmapFlags flags, ulong pages)
    {
        Type = type;
        Flags = flags;
        Bits = PmapBits.For(type, flags);
        _entries = new ulong[pages];
    }

    public ulong this[ulong page] => _entries[page];

    public bool IsValid(ulong page) => (_entries[page] & Bits.Valid) != 0;
    public bool IsAccessed(ulong page) => (_entries[page] & Bits.Accessed) != 0;
    public bool IsModified(ulong page) => (_entries[page] & Bits.Modified) != 0;
    public bool IsSwapped(ulong page) => (_entries[page] & Bits.Swapped) != 0;
    public bool IsHeld(ulong page) => (_entries[page] & Bits.Held) != 0;
    public bool IsSuperpage(ulong page) => (_entries[page] & Bits.Superpage) != 0;

    /// <summary>Resident, writable by mapping, but a guest write would fault (dirty emulation armed).</summary>
    public bool IsWriteProtected(ulong page) => IsValid(page) && (_entries[page] & Bits.ReadWrite) != 0 && !IsModified(page);

    public ulong Frame(ulong page) => _entries[page] & PmapBits.FrameMask;

    public PageAD AccessedDirty(ulong page) =>
        (IsAccessed(page) ? PageAD.Accessed : PageAD.None) | (IsModified(page) ? PageAD.Dirty : PageAD.None);

    /// <summary>The page now has contents in the memfd at <paramref name="memfdOffset"/>.</summary>
    public void SetResident(ulong page, ulong memfdOffset, bool writable)
    {
        var e = _entries[page];
        e &= ~(Bits.Swapped | PmapBits.FrameMask | Bits.ReadWrite);
        e |= Bits.Valid | (memfdOffset & PmapBits.FrameMask) | (writable ? Bits.ReadWrite : 0);
        Store(page, e);
    }

    /// <summary>The page's contents moved to the swap file at <paramref name="swapOffset"/>; A is
    /// gone with the mapping, and so is PS (a punched page is no longer in a huge page); M (dirty
    /// since the last clear) is kept.</summary>
    public void SetSwapped(ulong page, ulong swapOffset)
    {
        var e = _entries[page];
        e &= ~(Bits.Valid | Bits.ReadWrite | Bits.Accessed | Bits.Execute | Bits.Superpage | PmapBits.FrameMask);
        Store(page, e | Bits.Swapped | (swapOffset & PmapBits.FrameMask));
    }

    /// <summary>The page has no contents anywhere (a hole: the next touch reads zeros).</summary>
    public void SetEmpty(ulong page) => Store(page, _entries[page] & (Bits.Held | Bits.Modified));

    /// <summary>Sets or clears A (with emulation on EPT, execute follows A: both mean "mapped").</summary>
    public void SetAccessed(ulong page, bool on)
    {
        var mask = Bits.Accessed | (Flags.EmulateAccessedDirty ? Bits.Execute : 0);
        Store(page, on ? _entries[page] | mask : _entries[page] & ~mask);
    }

    public void SetModified(ulong page, bool on) =>
        Store(page, on ? _entries[page] | Bits.Modified : _entries[page] & ~Bits.Modified);

    public void SetHeld(ulong page, bool on) =>
        Store(page, on ? _entries[page] | Bits.Held : _entries[page] & ~Bits.Held);

    /// <summary>Records whether the host backs the page with a huge page (PS). Only a pmap whose
    /// <see cref="PmapFlags.Superpages"/> says the backing can have them takes PS.</summary>
    public void SetSuperpage(ulong page, bool on)
    {
        if (on && !Flags.Superpages) throw new InvalidOperationException("this pmap's backing has no superpages");
        Store(page, on ? _entries[page] | Bits.Superpage : _entries[page] & ~Bits.Superpage);
    }

    public ulong[] Snapshot(ulong firstPage, ulong count) => _entries.AsSpan((int)firstPage, (int)count).ToArray();

    /// <summary>The one place entries change: the counts follow the bits that flipped.</summary>
    private void Store(ulong page, ulong entry)
    {
        var old = _entries[page];
        var flipped = old ^ entry;
        if (flipped != 0)
        {
            ResidentPages = Count(ResidentPages, flipped, entry, Bits.Valid);
            SwappedPages = Count(SwappedPages, flipped, entry, Bits.Swapped);
            AccessedPages = Count(AccessedPages, flipped, entry, Bits.Accessed);
            DirtyPages = Count(DirtyPages, flipped, entry, Bits.Modified);
            SuperpageBackedPages = Count(SuperpageBackedPages, flipped, entry, Bits.Superpage);
            if (ResidentPages > PeakResidentPages) PeakResidentPages = ResidentPages;
        }
        _entries[page] = entry;
    }

    private static ulong Count(ulong count, ulong flipped, ulong entry, ulong bit) =>
        (flipped & bit) == 0 ? count : (entry & bit) != 0 ? count + 1 : count - 1;
}
