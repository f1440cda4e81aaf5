using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// Numbers the guest's RAM pages (the writable segments of a <see cref="GuestMemoryMap"/>, in
/// guest-physical order) 0..Total-1: the pmap's and the swap file's index. Read-only segments
/// (firmware and its alias) are not paged.
/// </summary>
internal sealed class RamPages
{
    public const ulong PageSize = 4096;

    public sealed record Range(GuestSegment Segment, ulong FirstPage, ulong Pages)
    {
        public GuestPhysAddr Gpa => Segment.Base;
        public MemfdRegion Backing => Segment.Backing;
        /// <summary>Start of this segment in the guest view (what userfaultfd registers).</summary>
        public nint GuestView => Segment.Backing.GuestView + (nint)Segment.BackingOffset;
        public bool Contains(ulong page) => page >= FirstPage && page - FirstPage < Pages;
        /// <summary>Offset of <paramref name="page"/> (of this range) in the backing memfd.</summary>
        public ulong MemfdOffset(ulong page) => Segment.BackingOffset + (page - FirstPage) * PageSize;
        /// <summary>Address of <paramref name="page"/> (of this range) in the guest view.</summary>
        public nint GuestAddress(ulong page) => GuestView + (nint)((page - FirstPage) * PageSize);
        /// <summary>Drops the guest view's mappings of <paramref name="count"/> pages from
        /// <paramref name="page"/> (MADV_DONTNEED; the memfd keeps the contents).</summary>
        public void DropGuestMappings(ulong page, ulong count) => Backing.DropGuestMappings(MemfdOffset(page), count * PageSize);
    }

    public IReadOnlyList<Range> Ranges { get; }
    public ulong Total { get; }

    public RamPages(GuestMemoryMap memory)
    {
        var ranges = new List<Range>();
        var next = 0UL;
        foreach (var s in memory.Segments.Where(s => !s.ReadOnly).OrderBy(s => s.Base.Value))
        {
            ranges.Add(new Range(s, next, s.Size / PageSize));
            next += s.Size / PageSize;
        }
        Ranges = ranges;
        Total = next;
    }

    public bool TryPage(GuestPhysAddr gpa, out ulong page)
    {
        foreach (var r in Ranges)
            if (gpa.Value >= r.Gpa.Value && gpa - r.Gpa < r.Pages * PageSize)
            {
                page = r.FirstPage + (gpa - r.Gpa) / PageSize;
                return true;
            }
        page = 0;
        return false;
    }

    /// <summary>
    /// The pages covering [gpa, gpa+length) (rounded out to pages), if all of them are RAM and
    /// contiguous in guest-physical space.
    /// </summary>
    public bool TryPages(GuestPhysAddr gpa, ulong length, out ulong first, out ulong count)
    {
        first = count = 0;
        if (length == 0 || gpa.Value + length < gpa.Value) return false;
        var start = new GuestPhysAddr(gpa.Value & ~(PageSize - 1));
        var last = new GuestPhysAddr((gpa.Value + length - 1) & ~(PageSize - 1));
        if (!TryPage(start, out first) || !TryPage(last, out var lastPage)) return false;
        count = lastPage - first + 1;
        return lastPage >= first && Gpa(lastPage) - Gpa(first) == (count - 1) * PageSize;
    }

    public Range RangeOf(ulong page)
    {
        foreach (var r in Ranges)
            if (r.Contains(page)) return r;
        throw new ArgumentOutOfRangeException(nameof(page), $"page {page} is not guest RAM");
    }

    public GuestPhysAddr Gpa(ulong page)
    {
        var r = RangeOf(page);
        return r.Gpa + (page - r.FirstPage) * PageSize;
    }

    public nint GuestAddress(ulong page) => RangeOf(page).GuestAddress(page);

    public ulong MemfdOffset(ulong page) => RangeOf(page).MemfdOffset(page);

    /// <summary>Guest-view address → guest-physical address (for the uffd reader).</summary>
    public bool TryGpaOfGuestAddress(ulong address, out GuestPhysAddr gpa)
    {
        foreach (var r in Ranges)
        {
            var start = (ulong)r.GuestView;
            if (address >= start && address - start < r.Pages * PageSize)
            {
                gpa = r.Gpa + (address - start);
                return true;
            }
        }
        gpa = default;
        return false;
    }

    /// <summary>Splits pages [first, first+count) at segment boundaries: each run is contiguous in the
    /// guest view and in the memfd.</summary>
    public IEnumerable<(Range Range, ulong First, ulong Count)> Runs(ulong first, ulong count)
    {
        var end = first + count;
        foreach (var r in Ranges)
        {
            var s = Math.Max(first, r.FirstPage);
            var e = Math.Min(end, r.FirstPage + r.Pages);
            if (s < e) yield return (r, s, e - s);
        }
    }

    /// <summary>Groups sorted pages into runs contiguous in index (and in one segment).</summary>
    public IEnumerable<(Range Range, ulong First, ulong Count)> Coalesce(IReadOnlyList<ulong> sortedPages, ulong maxRun = ulong.MaxValue)
    {
        var i = 0;
        while (i < sortedPages.Count)
        {
            var first = sortedPages[i];
            var r = RangeOf(first);
            var n = 1UL;
            while (i + (int)n < sortedPages.Count && sortedPages[i + (int)n] == first + n && r.Contains(first + n) && n < maxRun) n++;
            yield return (r, first, n);
            i += (int)n;
        }
    }
}
