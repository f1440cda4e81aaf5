using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>Where the A/D API's "dirty" comes from (config <c>actorvmm.vm.paging.dirty-tracking</c>).</summary>
public enum DirtyTracking
{
    /// <summary>userfaultfd write-protect (<c>uffd-wp</c>): a clear write-protects the guest view, the
    /// next write is a WP fault that sets M in the pmap. Needs demand paging.</summary>
    UffdWp,

    /// <summary>KVM's dirty bitmap with manual protection (<c>dirty-log</c>): a scan reads
    /// KVM_GET_DIRTY_LOG, a clear is KVM_CLEAR_DIRTY_LOG (which write-protects those pages again).</summary>
    DirtyLog,

    /// <summary>KVM's per-vcpu dirty rings (<c>dirty-ring</c>): each vcpu harvests its own ring on its own
    /// thread, as its part of the EPT barrier and whenever its ring fills, and sends the GFNs to the vmspace.</summary>
    DirtyRing,
}

public static class DirtyTrackingNames
{
    /// <summary>The config spelling: uffd-wp, dirty-log, dirty-ring.</summary>
    public static string ConfigName(this DirtyTracking t) => t switch
    {
        DirtyTracking.UffdWp => "uffd-wp",
        DirtyTracking.DirtyLog => "dirty-log",
        DirtyTracking.DirtyRing => "dirty-ring",
        _ => t.ToString(),
    };

    public static bool TryParse(string? text, out DirtyTracking tracking)
    {
        foreach (var t in Enum.GetValues<DirtyTracking>())
            if (t.ConfigName() == text)
            {
                tracking = t;
                return true;
            }
        tracking = default;
        return false;
    }
}

/// <summary>
/// The dirty pages the vmspace learns of as data: GFNs harvested from vcpus' dirty rings, and pages
/// the host wrote through the vmspace (which no KVM log sees). Indexed by RAM page (see RamPages).
/// <para>
/// A clear takes effect per vcpu at that vcpu's ack of the clear's EPT generation: a vcpu harvests
/// its ring just before it acks, so what it reports before its ack (the ack's own GFNs included) was
/// written before the clear and is dropped inside the cleared range, and what it reports after its
/// ack (a ring-full harvest) was written after the clear and is kept. A host write is ordered by
/// the vmspace's mailbox: after every clear already begun. Pure: no Akka, no KVM.
/// </para>
/// </summary>
internal sealed class DirtyPageLog(ulong pages)
{
    private sealed record PendingClear(ulong Generation, ulong First, ulong Count, HashSet<int> Waiting);

    private readonly ulong[] _bits = new ulong[(pages + 63) / 64];
    private readonly List<PendingClear> _clears = [];

    public ulong Pages { get; } = pages;

    /// <summary>Clears begun whose vcpus have not all acked.</summary>
    public int PendingClears => _clears.Count;

    public bool IsDirty(ulong page) => (_bits[page / 64] & (1UL << (int)(page % 64))) != 0;

    private void Set(ulong page, bool on)
    {
        if (on) _bits[page / 64] |= 1UL << (int)(page % 64);
        else _bits[page / 64] &= ~(1UL << (int)(page % 64));
    }

    /// <summary>The host wrote the page (after every clear begun so far).</summary>
    public void MarkDirty(ulong page) => Set(page, true);

    /// <summary>Begins a clear of [first, first+count) at <paramref name="generation"/>: what is known now
    /// goes, and until each of <paramref name="vcpus"/> acks, what it reports in the range is dropped.</summary>
    public void Clear(ulong generation, ulong first, ulong count, IEnumerable<int> vcpus)
    {
        for (var p = first; p < first + count; p++) Set(p, false);
        var waiting = vcpus.ToHashSet();
        if (waiting.Count > 0) _clears.Add(new PendingClear(generation, first, count, waiting));
    }

    /// <summary>Pages a vcpu harvested from its ring (in mailbox order with its acks).</summary>
    public void Harvested(int vcpu, IEnumerable<ulong> pages)
    {
        foreach (var page in pages)
        {
            if (page >= Pages) continue;
            var beforeAClear = false;
            foreach (var c in _clears)
                if (c.Waiting.Contains(vcpu) && page >= c.First && page - c.First < c.Count)
                {
                    beforeAClear = true;
                    break;
                }
            if (!beforeAClear) Set(page, true);
        }
    }

    /// <summary>The vcpu acked <paramref name="generation"/>: clears up to it are done for that vcpu.</summary>
    public void Acked(int vcpu, ulong generation)
    {
        foreach (var c in _clears)
            if (c.Generation <= generation) c.Waiting.Remove(vcpu);
        _clears.RemoveAll(c => c.Waiting.Count == 0);
    }

    /// <summary>The vcpu left the barrier: no clear waits for it any more.</summary>
    public void Forget(int vcpu) => Acked(vcpu, ulong.MaxValue);
}

/// <summary>
/// Reads and clears KVM's dirty bitmap (with manual protection) for runs of RAM pages: each RAM
/// segment is one memslot, logged since the VM was built. Fresh slots start clean and write-protected.
/// </summary>
internal sealed class DirtyLogReader(IDirtyLog log, RamPages ram, Func<GuestSegment, uint> slotOf)
{
    private const ulong BitsPerWord = 64;

    /// <summary>Whether KVM logged a write to each page of [first, first+count) since it was last cleared.</summary>
    public bool[] Scan(ulong first, ulong count)
    {
        var dirty = new bool[count];
        foreach (var (r, f, n) in ram.Runs(first, count))
        {
            var bitmap = log.GetDirtyLog(slotOf(r.Segment), r.Pages);
            for (var p = f; p < f + n; p++)
            {
                var i = p - r.FirstPage;
                dirty[p - first] = (bitmap[i / BitsPerWord] & (1UL << (int)(i % BitsPerWord))) != 0;
            }
        }
        return dirty;
    }

    /// <summary>
    /// KVM_CLEAR_DIRTY_LOG over [first, first+count) minus <paramref name="skip"/>: KVM forgets the
    /// pages' dirty bits and write-protects them, so their next write is logged. KVM wants the range
    /// to start at a multiple of 64 pages and to span a multiple of 64 unless it ends the slot: the
    /// bitmap covers that aligned range with bits set only for the pages asked.
    /// </summary>
    public void Clear(ulong first, ulong count, Func<ulong, bool> skip)
    {
        foreach (var (r, f, n) in ram.Runs(first, count))
        {
            var start = f - r.FirstPage;
            var aligned = start & ~(BitsPerWord - 1);
            var end = Math.Min((start + n + BitsPerWord - 1) & ~(BitsPerWord - 1), r.Pages);
            var bitmap = new ulong[(end - aligned + BitsPerWord - 1) / BitsPerWord];
            for (var i = start; i < start + n; i++)
            {
                if (skip(r.FirstPage + i)) continue;
                var b = i - aligned;
                bitmap[b / BitsPerWord] |= 1UL << (int)(b % BitsPerWord);
            }
            log.ClearDirtyLog(slotOf(r.Segment), aligned, (uint)(end - aligned), bitmap);
        }
    }
}
