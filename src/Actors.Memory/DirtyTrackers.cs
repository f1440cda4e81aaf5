using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// Where the A/D API's D bit comes from, one implementation per <see cref="DirtyTracking"/> mode:
/// <see cref="UffdWpTracker"/>, <see cref="DirtyLogTracker"/>, <see cref="DirtyRingTracker"/>. Pages
/// are RAM page numbers (<see cref="RamPages"/>). The vmspace actor owns the EPT barrier: it opens
/// a generation for every clear (and, if <see cref="ScanWaitsForVcpus"/>, for every scan) and
/// answers when every vcpu acked it; the tracker says what happens on either side of it.
/// A held page is always dirty (a holder writes through the host view, which no tracker sees).
/// </summary>
internal interface IDirtyTracker
{
    DirtyTracking Mode { get; }

    /// <summary>Why this tracker cannot work in this vmspace (checked when it starts); null if it can.</summary>
    string? Unusable { get; }

    /// <summary>A clear needs demand paging (userfaultfd).</summary>
    bool NeedsPaging { get; }

    /// <summary>Why a clear cannot be done with <paramref name="pager"/>; null if it can.</summary>
    string? CannotClear(GuestPager pager);

    /// <summary>The dirty pages are with the vcpus until they harvest them: a scan is answered only
    /// once every vcpu acked a new EPT generation (each harvests just before it acks).</summary>
    bool ScanWaitsForVcpus { get; }

    /// <summary>A (from the pmap) and D of each page of [first, first+count).</summary>
    PageAD[] Scan(GuestPager pager, ulong first, ulong count);

    /// <summary>Clears D over [first, first+count) (held pages stay dirty). Called once the clear's
    /// EPT generation <paramref name="generation"/> was sent to <paramref name="vcpus"/>; the clear is
    /// complete when all of them acked it.</summary>
    void Clear(GuestPager pager, ulong first, ulong count, ulong generation, IReadOnlyList<int> vcpus);

    /// <summary>The host wrote [first, first+count) through the vmspace (after every clear begun so far).</summary>
    void HostWrote(ulong first, ulong count);

    /// <summary>A vcpu harvested <paramref name="pages"/> from its dirty ring (in mailbox order with
    /// its acks). <paramref name="overflowed"/>: the ring was full, writes may be lost. Returns
    /// whether every RAM page was therefore made dirty.</summary>
    bool Harvested(int vcpu, IReadOnlyList<ulong> pages, bool overflowed);

    /// <summary>The vcpu acked <paramref name="generation"/>.</summary>
    void Acked(int vcpu, ulong generation);

    /// <summary>The vcpu left the EPT barrier.</summary>
    void Forget(int vcpu);
}

internal static class DirtyTrackers
{
    /// <summary>The tracker for <paramref name="mode"/>. <paramref name="log"/>: KVM's dirty log (dirty-log only).</summary>
    internal static IDirtyTracker Create(DirtyTracking mode, GuestMemoryMap memory, IDirtyLog? log) => mode switch
    {
        DirtyTracking.DirtyLog => new DirtyLogTracker(new RamPages(memory), log, memory.SlotOf),
        DirtyTracking.DirtyRing => new DirtyRingTracker(new RamPages(memory)),
        _ => new UffdWpTracker(),
    };
}

/// <summary>
/// uffd-wp: D is the pmap's M, which <see cref="FaultResolver"/> sets on a WP fault; a clear
/// write-protects the guest view (UFFDIO_WRITEPROTECT) so the next write faults. A host write sets
/// M itself (<see cref="HostAccess"/>). The vcpus take no part.
/// </summary>
internal sealed class UffdWpTracker : IDirtyTracker
{
    public DirtyTracking Mode => DirtyTracking.UffdWp;
    public string? Unusable => null;
    public bool NeedsPaging => true;
    public string? CannotClear(GuestPager pager) => pager.TracksDirty ? null : $"no dirty-bit emulation: {pager.Features}";
    public bool ScanWaitsForVcpus => false;
    public PageAD[] Scan(GuestPager pager, ulong first, ulong count) => pager.AccessedDirty.Scan(first, count);

    public void Clear(GuestPager pager, ulong first, ulong count, ulong generation, IReadOnlyList<int> vcpus)
    {
        if (!pager.AccessedDirty.ClearDirty(first, count)) throw new VmspaceException($"no dirty-bit emulation: {pager.Features}");
    }

    public void HostWrote(ulong first, ulong count) { }
    public bool Harvested(int vcpu, IReadOnlyList<ulong> pages, bool overflowed) => false;
    public void Acked(int vcpu, ulong generation) { }
    public void Forget(int vcpu) { }
}

/// <summary>
/// KVM's tracking (dirty-log, dirty-ring): D is what KVM logged, plus what the vmspace learns as data
/// (<see cref="DirtyPageLog"/>: ring harvests, host writes, which no KVM log sees), plus held pages.
/// Works with or without demand paging.
/// </summary>
internal abstract class KvmDirtyTracker(RamPages ram) : IDirtyTracker
{
    protected readonly DirtyPageLog Known = new(ram.Total);

    public abstract DirtyTracking Mode { get; }
    public virtual string? Unusable => null;
    public bool NeedsPaging => false;
    public string? CannotClear(GuestPager pager) => null;
    public abstract bool ScanWaitsForVcpus { get; }
    public abstract void Clear(GuestPager pager, ulong first, ulong count, ulong generation, IReadOnlyList<int> vcpus);

    /// <summary>What KVM's log says of [first, first+count), or null if the data is all harvested.</summary>
    protected abstract bool[]? Logged(ulong first, ulong count);

    public PageAD[] Scan(GuestPager pager, ulong first, ulong count)
    {
        var result = pager.AccessedDirty.Scan(first, count);
        var logged = Logged(first, count);
        for (var i = 0UL; i < count; i++)
        {
            var p = first + i;
            var dirty = (logged?[i] ?? false) || Known.IsDirty(p) || pager.Pmap.IsHeld(p);
            result[i] = (result[i] & PageAD.Accessed) | (dirty ? PageAD.Dirty : PageAD.None);
        }
        return result;
    }

    public void HostWrote(ulong first, ulong count)
    {
        for (var p = first; p < first + count; p++) Known.MarkDirty(p);
    }

    /// <summary>GFNs outside RAM are ignored. A ring found full may have lost writes (see
    /// <see cref="DirtyRing"/>): every RAM page is then dirty.</summary>
    public bool Harvested(int vcpu, IReadOnlyList<ulong> gfns, bool overflowed)
    {
        if (overflowed)
            for (var p = 0UL; p < Known.Pages; p++) Known.MarkDirty(p);
        var pages = new List<ulong>(gfns.Count);
        foreach (var gfn in gfns)
            if (ram.TryPage(new GuestPhysAddr(gfn << 12), out var page)) pages.Add(page);
        Known.Harvested(vcpu, pages);
        return overflowed;
    }

    public void Acked(int vcpu, ulong generation) => Known.Acked(vcpu, generation);
    public void Forget(int vcpu) => Known.Forget(vcpu);
}

/// <summary>
/// dirty-log: KVM's dirty bitmap with manual protection (KVM api.rst, KVM_GET_DIRTY_LOG,
/// KVM_CLEAR_DIRTY_LOG, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2). A scan reads the bitmap now; a clear is
/// KVM_CLEAR_DIRTY_LOG (held pages skipped), which write-protects the pages again.
/// </summary>
internal sealed class DirtyLogTracker(RamPages ram, IDirtyLog? log, Func<GuestSegment, uint> slotOf) : KvmDirtyTracker(ram)
{
    private readonly DirtyLogReader? _reader = log is null ? null : new DirtyLogReader(log, ram, slotOf);

    public override DirtyTracking Mode => DirtyTracking.DirtyLog;
    public override string? Unusable => _reader is null ? "dirty-tracking = dirty-log, but the vmspace was given no KVM dirty log" : null;
    public override bool ScanWaitsForVcpus => false;
    protected override bool[]? Logged(ulong first, ulong count) => _reader?.Scan(first, count);

    public override void Clear(GuestPager pager, ulong first, ulong count, ulong generation, IReadOnlyList<int> vcpus)
    {
        _reader!.Clear(first, count, pager.Pmap.IsHeld);
        Known.Clear(generation, first, count, []); // no vcpu reports pages: nothing to wait for
    }
}

/// <summary>
/// dirty-ring: KVM's per-vcpu dirty rings (KVM api.rst, KVM_CAP_DIRTY_LOG_RING, KVM_RESET_DIRTY_RINGS).
/// Each vcpu harvests its own ring on its own thread, just before it acks an EPT generation and
/// whenever its ring fills, and sends the GFNs here. A scan therefore waits for every vcpu's ack. A
/// clear takes effect per vcpu at its ack: what a vcpu reports in the range before it is older than
/// the clear and dropped (<see cref="DirtyPageLog"/>); the vcpus reset their rings as they harvest
/// (KVM re-protects what they harvested).
/// </summary>
internal sealed class DirtyRingTracker(RamPages ram) : KvmDirtyTracker(ram)
{
    public override DirtyTracking Mode => DirtyTracking.DirtyRing;
    public override bool ScanWaitsForVcpus => true;
    protected override bool[]? Logged(ulong first, ulong count) => null;

    public override void Clear(GuestPager pager, ulong first, ulong count, ulong generation, IReadOnlyList<int> vcpus) =>
        Known.Clear(generation, first, count, vcpus);
}
