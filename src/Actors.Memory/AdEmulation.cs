namespace ActorVmm.Memory;

/// <summary>
/// The emulated accessed and dirty bits as the A/D API sees them (the seed's A/D emulation; software
/// bits in the pmap, <see cref="Pmap"/>): a clear makes the next touch or write fault, and
/// <see cref="FaultResolver"/> sets the bit again when it resolves that fault. A clear: MADV_DONTNEED
/// on the guest view (the next touch is a MINOR fault). M clear: UFFDIO_WRITEPROTECT (the next write
/// is a WP fault). The caller makes running vcpus see a clear (the EPT barrier).
/// </summary>
internal sealed class AdEmulation(GuestPager pager)
{
    private Pmap Pmap => pager.Pmap;

    /// <summary>Clears A: drops the guest-view mappings so the next touch is a MINOR fault. False if
    /// accessed-bit emulation is unavailable (A stays set).</summary>
    public bool ClearAccessed(ulong first, ulong count)
    {
        if (!pager.TracksAccessed) return false;
        foreach (var (r, f, n) in pager.Ram.Runs(first, count)) r.DropGuestMappings(f, n);
        for (var p = first; p < first + count; p++) Pmap.SetAccessed(p, false);
        return true;
    }

    /// <summary>
    /// Drops the guest view's mapping of one RAM page and keeps its contents (pc-testdev's flush):
    /// KVM's MMU notifier zaps the page's EPT entry before madvise returns, so the guest's next touch
    /// faults it in again. With accessed-bit emulation that touch is a MINOR fault (A is clear, as
    /// after <see cref="ClearAccessed"/>); without it the kernel maps the page again from the memfd
    /// by itself. A page that is not resident is mapped nowhere: nothing to drop.
    /// </summary>
    public void Flush(ulong page)
    {
        if (!Pmap.IsValid(page)) return;
        if (pager.TracksAccessed)
        {
            ClearAccessed(page, 1);
            return;
        }
        pager.Ram.RangeOf(page).DropGuestMappings(page, 1);
    }

    /// <summary>Clears M: write-protects the guest view so the next write is a WP fault. Held pages
    /// are skipped (never write-protected under a holder; they stay dirty). False if dirty-bit
    /// emulation is unavailable.</summary>
    public bool ClearDirty(ulong first, ulong count)
    {
        if (!pager.TracksDirty) return false;
        var pages = new List<ulong>();
        for (var p = first; p < first + count; p++)
            if (!Pmap.IsHeld(p)) pages.Add(p);
        pager.WriteProtect(pages, protect: true);
        foreach (var p in pages) Pmap.SetModified(p, false);
        return true;
    }

    /// <summary>A and D of each page of [first, first+count) as the pmap has them.</summary>
    public PageAD[] Scan(ulong first, ulong count)
    {
        var result = new PageAD[count];
        for (var i = 0UL; i < count; i++) result[i] = Pmap.AccessedDirty(first + i);
        return result;
    }
}
