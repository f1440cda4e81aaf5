using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// Reads and writes of guest memory for devices and tools while the vmspace pages: through the host
/// view and the memfd, never the guest view (a managed thread must not fault on it), and without
/// disturbing paging: a read allocates nothing and brings nothing back; a write makes its pages
/// resident and dirty, as the guest's own write would. Non-RAM segments (firmware) are read and
/// written directly.
/// </summary>
internal sealed class HostAccess(GuestPager pager, GuestMemoryMap memory)
{
    private const ulong Page = GuestPager.Page;

    /// <summary>Reads guest memory: swapped pages come from the swap store, pages of a lazy restore
    /// from its file, holes read as zeros
    /// without being allocated (pread on the memfd). False if the range is not all mapped.</summary>
    public bool TryRead(GuestPhysAddr gpa, Span<byte> destination)
    {
        if (!memory.IsMapped(gpa, (ulong)destination.Length)) return false;
        var done = 0;
        while (done < destination.Length)
        {
            var a = gpa + (ulong)done;
            var inPage = (int)(a.Value & (Page - 1));
            var n = (int)Math.Min((ulong)(destination.Length - done), Page - (ulong)inPage);
            var chunk = destination.Slice(done, n);
            if (!pager.Ram.TryPage(a, out var page)) memory.Read(a, chunk);
            else if (pager.Pmap.IsSwapped(page))
            {
                var bounce = pager.Bounce;
                pager.Swap!.Read(page, bounce);
                bounce.Slice(inPage, n).CopyTo(chunk);
            }
            else if (pager.IsPendingRestore(page)) pager.Restore!.ReadPart(page, inPage, chunk); // stays pending
            else
            {
                var r = pager.Ram.RangeOf(page);
                var got = RandomAccess.Read(pager.MemfdHandle(r.Backing), chunk, (long)(r.MemfdOffset(page) + (ulong)inPage));
                if (got != n) throw new VmspaceException($"pread of guest memory at {a} returned {got} of {n} bytes");
            }
            done += n;
        }
        return true;
    }

    /// <summary>Writes guest memory: swapped pages come back first, written pages become resident and
    /// dirty (and lose their write protection, as the guest would). False if the range is not all mapped.</summary>
    public bool TryWrite(GuestPhysAddr gpa, ReadOnlySpan<byte> source)
    {
        if (!memory.IsMapped(gpa, (ulong)source.Length)) return false;
        var pages = new List<ulong>();
        var end = gpa.Value + (ulong)source.Length;
        for (var pa = gpa.Value & ~(Page - 1); source.Length > 0 && pa < end; pa += Page)
            if (pager.Ram.TryPage(new GuestPhysAddr(pa), out var page)) pages.Add(page);
        var unprotect = pager.PrepareHostWrite(pages, allocate: false);
        memory.Write(gpa, source);
        pager.WriteProtect(unprotect, protect: false);
        return true;
    }
}
