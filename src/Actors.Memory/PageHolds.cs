namespace ActorVmm.Memory;

/// <summary>
/// The seed's vm_gpa_hold / vm_gpa_release on the pmap: a held page is pinned for host-side
/// (device) access. Holding brings it in (swapped pages come back into the memfd, empty ones are
/// allocated, as vm_gpa_hold faults the page in) and takes the guest view's write protection off: a
/// holder writes through the host view, which no fault sees, so held pages count as dirty. Held
/// pages are never swapped out, aged or write-protected. Holds of one page nest (a count per page);
/// the leases (who holds what) are the vmspace actor's.
/// </summary>
internal sealed class PageHolds(GuestPager pager)
{
    private readonly Dictionary<ulong, int> _counts = [];

    /// <summary>Pages held at least once.</summary>
    public ulong HeldPages => (ulong)_counts.Count;

    public void Hold(ulong first, ulong count)
    {
        var pages = new List<ulong>();
        for (var p = first; p < first + count; p++) pages.Add(p);
        var unprotect = pager.PrepareHostWrite(pages, allocate: true);
        foreach (var p in pages)
        {
            _counts[p] = _counts.GetValueOrDefault(p) + 1;
            pager.Pmap.SetHeld(p, true);
        }
        pager.WriteProtect(unprotect, protect: false);
    }

    /// <summary>Releases one hold of each page; a page is unheld when its last hold goes.</summary>
    public void Release(ulong first, ulong count)
    {
        for (var p = first; p < first + count; p++)
        {
            var c = _counts.GetValueOrDefault(p) - 1;
            if (c > 0) _counts[p] = c;
            else
            {
                _counts.Remove(p);
                pager.Pmap.SetHeld(p, false);
            }
        }
    }
}
