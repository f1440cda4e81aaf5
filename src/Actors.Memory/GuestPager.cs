using ActorVmm.LibVmm;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>An invariant of the vmspace's paging broke (the pmap and the kernel disagree beyond a race).</summary>
public sealed class VmspaceException(string message) : Devices.InvariantViolationException(message);

/// <summary>
/// The paging half of the vmspace, without Akka: the pmap, the userfaultfd and its registration,
/// the swap store, and the moves of pages between the memfd, the guest view and the swap store that
/// several jobs share. Each job is its own type over it:
/// <list type="bullet">
/// <item><see cref="FaultResolver"/> (<see cref="Faults"/>): nested page faults, with the page-state transition table;</item>
/// <item><see cref="AdEmulation"/> (<see cref="AccessedDirty"/>): clear and scan of the emulated A/D bits;</item>
/// <item><see cref="ClockReclaimer"/> (<see cref="Reclaimer"/>): the resident limit, the clock, the swapper's sample and page-out;</item>
/// <item><see cref="PageHolds"/> (<see cref="Holds"/>): vm_gpa_hold / vm_gpa_release;</item>
/// <item><see cref="HostAccess"/> (<see cref="Host"/>): reads and writes of guest memory through the host view.</item>
/// </list>
/// Owned and called by one actor: not thread-safe, except that the kernel lets other threads fault
/// while it works (they wait for the resolving ioctl). Only vcpus (inside KVM_RUN) and native code
/// may touch the guest view; managed code uses the host view (see <see cref="Userfaultfd"/> on the
/// GC deadlock otherwise).
/// </summary>
internal sealed unsafe class GuestPager : IDisposable
{
    internal const ulong Page = RamPages.PageSize;

    private readonly GuestMemoryMap _memory;
    private UffdReader? _reader;
    private readonly Dictionary<MemfdRegion, SafeFileHandle> _memfdHandles = [];
    private byte* _zeroPage;
    private readonly byte* _bounce = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)Page, (nuint)Page);
    private bool _disposed;

    /// <summary>Guest writes are tracked (uffd WP on shmem): dirty-bit emulation.</summary>
    public bool TracksDirty { get; }
    /// <summary>Guest touches after a clear are tracked (uffd MINOR on shmem): accessed-bit emulation.</summary>
    public bool TracksAccessed { get; }
    public bool Paging => Uffd is not null;
    /// <summary>Userfaultfd is registered only to bring a lazy restore in (MISSING faults, no A/D
    /// emulation, no swap): demand paging is off in the options.</summary>
    public bool RestoreOnly { get; }
    public bool CanSwap => Uffd is not null && Swap is not null;
    public bool CanZeroPage { get; }
    public string Features { get; private set; } = "userfaultfd off";
    /// <summary>Whether guest RAM can be superpage-backed here, and why (for stats and logs).</summary>
    public string Superpages { get; } = "";
    public Pmap Pmap { get; }
    public RamPages Ram { get; }

    /// <summary>The registered userfaultfd; null without demand paging.</summary>
    internal Userfaultfd? Uffd { get; private set; }
    /// <summary>The lazy restore source; null without one (or after an eager restore).</summary>
    internal RestoreImage? Restore { get; }
    /// <summary>The swap file; null without one (or without demand paging).</summary>
    internal SwapStore? Swap { get; }

    public FaultResolver Faults { get; }
    public AdEmulation AccessedDirty { get; }
    public ClockReclaimer Reclaimer { get; }
    public PageHolds Holds { get; }
    public HostAccess Host { get; }

    /// <summary>Pages brought back from the swap store (by a fault or for the host), and sent to it.</summary>
    public long SwapIns, SwapOuts;

    /// <param name="memory">guest RAM: the memfd-backed segments, their guest and host views</param>
    /// <param name="options">paging: userfaultfd, dirty tracking, swap file, resident limit</param>
    /// <param name="clockMs">Milliseconds of a monotonic clock (tests pass their own); only for
    /// giving up on a fault that the kernel keeps reporting.</param>
    /// <param name="restore">a lazy restore source (opened: guest RAM already emptied); the pager
    /// fills each page of it on its first touch, and registers userfaultfd for that even when
    /// <paramref name="options"/> have demand paging off (then MISSING only: <see cref="RestoreOnly"/>)</param>
    public GuestPager(GuestMemoryMap memory, VmspaceOptions options, Func<long>? clockMs = null, RestoreImage? restore = null)
    {
        _memory = memory;
        Ram = new RamPages(memory);
        Restore = restore;
        RestoreOnly = !options.Userfaultfd && restore is not null;
        try
        {
            if (options.Userfaultfd || RestoreOnly)
            {
                Uffd = Userfaultfd.Create(UffdFeatures.ForShmemVmspace);
                if ((Uffd.Enabled & UffdFeatures.MissingShmem) == 0)
                    throw new UserfaultfdException($"this kernel cannot demand-page shmem: {Uffd.Describe()}");
                var mode = UffdRegisterMode.Missing;
                if ((Uffd.Enabled & UffdFeatures.WpShmem) != 0 && options.DirtyTracking == DirtyTracking.UffdWp && !RestoreOnly) mode |= UffdRegisterMode.WriteProtect;
                if ((Uffd.Enabled & UffdFeatures.MinorShmem) != 0 && !RestoreOnly) mode |= UffdRegisterMode.Minor;
                var ioctls = ~UffdRangeIoctls.None;
                foreach (var r in Ram.Ranges) ioctls &= Uffd.Register(r.GuestView, r.Pages * Page, mode);
                if ((ioctls & (UffdRangeIoctls.Copy | UffdRangeIoctls.Wake)) != (UffdRangeIoctls.Copy | UffdRangeIoctls.Wake))
                    throw new UserfaultfdException($"registered guest RAM lacks UFFDIO_COPY/WAKE (range ioctls {ioctls})");
                TracksDirty = (mode & UffdRegisterMode.WriteProtect) != 0 && (ioctls & UffdRangeIoctls.WriteProtect) != 0;
                TracksAccessed = (mode & UffdRegisterMode.Minor) != 0 && (ioctls & UffdRangeIoctls.Continue) != 0;
                CanZeroPage = (ioctls & UffdRangeIoctls.ZeroPage) != 0;
                Features = (RestoreOnly ? "userfaultfd for a lazy restore only; " : "") + $"{Uffd.Describe()}; registered {mode}; range ioctls {ioctls}" +
                           (TracksAccessed ? "" : "; no accessed-bit emulation (A reported set while resident)") +
                           (TracksDirty ? "" : "; no dirty-bit emulation (M reported set while resident)");
            }
            var flags = TracksAccessed && TracksDirty ? PmapFlags.UffdEmulated : PmapFlags.Untracked;
            (var superpages, Superpages) = SuperpageSupport(memory, Uffd is not null);
            Pmap = new Pmap(options.PmapType, flags with { Superpages = superpages }, Ram.Total);
            if (Uffd is not null && !RestoreOnly && options.SwapFile is not null) Swap = new SwapStore(options.SwapFile);
            Faults = new FaultResolver(this, clockMs ?? (() => Environment.TickCount64));
            AccessedDirty = new AdEmulation(this);
            Reclaimer = new ClockReclaimer(this, Uffd is null || RestoreOnly ? 0 : options.ResidentLimitBytes / Page, options.ColdScans);
            Holds = new PageHolds(this);
            Host = new HostAccess(this, memory);
            if (Reclaimer.ResidentLimitPages > 0 && !CanSwap)
                throw new ArgumentException("a resident limit needs a swap file");
            ScanResidency();
            // A page still in the file keeps its saved D (or, without an A/D file, is dirty: its
            // history is unknown), as a swapped page keeps M: its fill maps it write-protected only if clean.
            if (restore is not null)
                for (var p = 0UL; p < Ram.Total; p++)
                    if (restore.IsPending(p)) Pmap.SetModified(p, !TracksDirty || restore.SavedDirty(p) != false);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>A page of zeros (native memory: an ioctl's source).</summary>
    internal ReadOnlySpan<byte> ZeroPage => new(ZeroPagePointer, (int)Page);

    private byte* ZeroPagePointer
    {
        get
        {
            if (_zeroPage is null)
            {
                _zeroPage = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)Page, (nuint)Page);
                new Span<byte>(_zeroPage, (int)Page).Clear();
            }
            return _zeroPage;
        }
    }

    /// <summary>One page of native scratch memory (an ioctl's source); one user at a time.</summary>
    internal Span<byte> Bounce => new(_bounce, (int)Page);

    /// <summary>
    /// Marks the pages that already have contents in the memfd (a loader wrote them through the host
    /// view before the vmspace started). With accessed-bit emulation the guest view is zapped first,
    /// so A clear is true (the next touch is a MINOR fault); their history is unknown, so M is set
    /// (not write-protected; a dirty-page harvest must send them).
    /// </summary>
    private void ScanResidency()
    {
        if (TracksAccessed)
            foreach (var r in Ram.Ranges)
                r.DropGuestMappings(r.FirstPage, r.Pages);
        foreach (var r in Ram.Ranges)
            foreach (var (offset, length) in r.Backing.DataRanges(r.Segment.BackingOffset, r.Pages * Page))
            {
                var first = r.FirstPage + (offset - r.Segment.BackingOffset) / Page;
                for (var p = first; p < first + length / Page; p++)
                {
                    Pmap.SetResident(p, Ram.MemfdOffset(p), writable: true);
                    Pmap.SetAccessed(p, !TracksAccessed);
                    Pmap.SetModified(p, true);
                }
            }
    }

    /// <summary>Without fault tracking the pmap can only follow the memfd: refresh V from it, and
    /// PS from the host's page tables.</summary>
    public void RefreshUntracked()
    {
        if (Paging) return;
        for (var p = 0UL; p < Ram.Total; p++)
            if (Pmap.IsValid(p)) Pmap.SetEmpty(p);
        ScanResidency();
        RefreshSuperpages();
    }

    /// <summary>
    /// Superpages (FreeBSD's pm_flags PMAP_PDE_SUPERPAGE): only without userfaultfd, and only where
    /// the RAM memfd was advised MADV_HUGEPAGE (which it is only if the host's shmem THP setting
    /// allows huge pages). With userfaultfd there are none, whatever the host allows: shmem raises the
    /// MISSING fault before it would allocate a huge page, the fills (UFFDIO_COPY/ZEROPAGE) allocate
    /// 4 KiB pages, and UFFDIO_CONTINUE maps one 4 KiB PTE (measured behaviour of Linux 6.x
    /// mm/shmem.c and mm/userfaultfd.c).
    /// </summary>
    public static (bool Possible, string Why) SuperpageSupport(GuestMemoryMap memory, bool userfaultfd)
    {
        var host = ShmemHugePages.Read();
        var hostText = $"host {host.Reason}";
        if (userfaultfd) return (false, $"off: userfaultfd fills and maps 4 KiB pages ({hostText})");
        if (!host.Allowed) return (false, $"off: {hostText}");
        if (memory.Segments.Any(r => !r.ReadOnly && !r.Backing.HugePagesAdvised)) return (false, $"off: guest RAM not advised MADV_HUGEPAGE (superpages turned off; {hostText})");
        return (true, $"on: guest RAM advised MADV_HUGEPAGE ({hostText})");
    }

    /// <summary>Sets PS on the pages the host maps in the guest view with a PMD-size page (KVM can
    /// then map them with one 2 MiB entry), clears it elsewhere.</summary>
    private void RefreshSuperpages()
    {
        if (!Pmap.Flags.Superpages) return;
        var huge = new bool[Ram.Total];
        foreach (var r in Ram.Ranges)
        {
            if (!HugeMappings.TryScan(r.GuestView, r.Pages * Page, out var runs, out var error))
                throw new VmspaceException($"cannot learn which guest RAM is superpage-backed: {error}");
            foreach (var (offset, length) in runs)
                for (var p = r.FirstPage + offset / Page; p < r.FirstPage + (offset + length) / Page && p < r.FirstPage + r.Pages; p++)
                    huge[p] = true;
        }
        for (var p = 0UL; p < Ram.Total; p++)
            if (huge[p] != Pmap.IsSuperpage(p)) Pmap.SetSuperpage(p, huge[p]);
    }

    /// <summary>Starts the reader thread; faults go to <paramref name="onFault"/> with their guest-physical address.</summary>
    public void StartReader(Action<GuestPhysAddr, FaultKind, bool> onFault, Action<Exception> onError)
    {
        if (Uffd is null) return;
        _reader = new UffdReader(Uffd, f =>
        {
            if (Ram.TryGpaOfGuestAddress(f.Address, out var gpa)) onFault(gpa, f.Kind, f.Write);
            else onError(new VmspaceException($"userfaultfd fault at host address 0x{f.Address:X} is in no RAM segment"));
        }, onError, "vmspace-uffd");
    }

    // ---------------------------------------------------------------- moves shared by the jobs

    /// <summary>Drops the guest view's mappings of <paramref name="sortedPages"/>: the next guest
    /// touch of each faults (a MINOR fault with accessed-bit emulation).</summary>
    internal void DropGuestMappings(IReadOnlyList<ulong> sortedPages)
    {
        foreach (var (r, f, n) in Ram.Coalesce(sortedPages)) r.DropGuestMappings(f, n);
    }

    /// <summary>UFFDIO_WRITEPROTECT on or off over sorted <paramref name="sortedPages"/> of the guest view
    /// (off wakes writers waiting on them); nothing without dirty-bit emulation.</summary>
    internal void WriteProtect(IReadOnlyList<ulong> sortedPages, bool protect)
    {
        if (!TracksDirty) return;
        foreach (var (r, f, n) in Ram.Coalesce(sortedPages))
            Uffd!.WriteProtect(r.GuestAddress(f), n * Page, protect);
    }

    /// <summary>
    /// Makes sorted <paramref name="sortedPages"/> ready for the host to write through the host view,
    /// which no fault sees: swapped pages come back into the memfd, empty ones become resident
    /// (written with zeros first if <paramref name="allocate"/>; else the caller's write allocates
    /// them), and all get M. Returns the pages that were not dirty: the caller takes their guest view's
    /// write protection off (<see cref="WriteProtect"/>), as a guest write would.
    /// </summary>
    internal List<ulong> PrepareHostWrite(IReadOnlyList<ulong> sortedPages, bool allocate)
    {
        var unprotect = new List<ulong>();
        foreach (var p in sortedPages)
        {
            if (Pmap.IsSwapped(p)) SwapInToMemfd(p);
            else if (IsPendingRestore(p)) RestoreInToMemfd(p);
            else if (!Pmap.IsValid(p))
            {
                // pwrite of zeros, not fallocate: a fallocated page that was never written reads as a
                // hole to SEEK_DATA (measured), and the pmap's "valid" must match what the memfd says.
                if (allocate) RandomAccess.Write(MemfdHandle(Ram.RangeOf(p).Backing), ZeroPage, (long)Ram.MemfdOffset(p));
                Pmap.SetResident(p, Ram.MemfdOffset(p), writable: true);
                Pmap.SetAccessed(p, !TracksAccessed);
            }
            if (!Pmap.IsModified(p)) unprotect.Add(p);
            Pmap.SetModified(p, true);
        }
        return unprotect;
    }

    /// <summary>Brings a swapped page back into the memfd (not into the guest view: its next guest
    /// touch is a MINOR fault), for host-side access.</summary>
    internal void SwapInToMemfd(ulong page)
    {
        var bounce = Bounce;
        Swap!.Read(page, bounce);
        RandomAccess.Write(MemfdHandle(Ram.RangeOf(page).Backing), bounce, (long)Ram.MemfdOffset(page));
        Pmap.SetResident(page, Ram.MemfdOffset(page), writable: true);
        Pmap.SetAccessed(page, false);
        SwapIns++;
    }

    /// <summary>The page still lives only in the lazy restore's file (not valid in the memfd).</summary>
    internal bool IsPendingRestore(ulong page) => Restore is { } r && !r.Closed && r.IsPending(page) && !Pmap.IsValid(page);

    /// <summary>Brings a page of the lazy restore into the memfd (not into the guest view: with
    /// accessed-bit emulation its next guest touch is a MINOR fault; without, the kernel maps it), for
    /// host-side access. M stays as the restore set it.</summary>
    internal void RestoreInToMemfd(ulong page)
    {
        var r = Ram.RangeOf(page);
        Restore!.Read(page, r.Backing.HostSpan(r.MemfdOffset(page), (int)Page));
        Restore.Taken(page);
        Pmap.SetResident(page, r.MemfdOffset(page), writable: true);
        Pmap.SetAccessed(page, !TracksAccessed);
    }

    /// <summary>
    /// A restore-only pager whose file has no page left to bring in: stops the reader, unregisters
    /// guest RAM (waking any faulter: it faults normally from now on), closes the userfaultfd and the
    /// file. The vmspace is unpaged from then on (<see cref="Paging"/> false; the pmap follows the memfd).
    /// </summary>
    public bool FinishRestoreIfDone()
    {
        if (Restore is not { PendingPages: 0, Closed: false } r) return false;
        r.Dispose();
        if (!RestoreOnly || Uffd is null) return true;
        _reader?.Dispose();
        _reader = null;
        foreach (var range in Ram.Ranges)
            try { Uffd.Unregister(range.GuestView, range.Pages * Page); } catch (Exception) { /* closing unregisters too */ }
        Uffd.Dispose();
        Uffd = null;
        Features += "; lazy restore complete: userfaultfd closed";
        return true;
    }

    /// <summary>
    /// Swaps out sorted, resident <paramref name="sortedPages"/>. For each run: zap the guest view
    /// first (from then on a guest touch faults and waits for the vmspace), save the contents, punch
    /// them out of the memfd. With KVM the zap also reaches the EPT (mmu notifiers) before madvise
    /// returns.
    /// </summary>
    internal void SwapOut(IReadOnlyList<ulong> sortedPages)
    {
        if (!CanSwap) throw new VmspaceException("swapping needs userfaultfd and a swap file");
        for (var i = 0; i < sortedPages.Count; i++)
            if (!Pmap.IsValid(sortedPages[i]) || (i > 0 && sortedPages[i] <= sortedPages[i - 1]))
                throw new VmspaceException($"swap-out of page {sortedPages[i]}: not resident, or listed twice");
        foreach (var (r, f, n) in Ram.Coalesce(sortedPages, SwapStore.MaxRunPages))
        {
            r.DropGuestMappings(f, n);
            Swap!.Write(f, r.Backing.HostSpan(r.MemfdOffset(f), (int)(n * Page)));
            r.Backing.PunchHole(r.MemfdOffset(f), n * Page);
            for (var p = f; p < f + n; p++)
            {
                Pmap.SetSwapped(p, SwapStore.Offset(p));
                Faults.Forget(p);
                Reclaimer.Forget(p);
            }
            SwapOuts += (long)n;
        }
    }

    /// <summary>A file handle on a memfd for pread/pwrite (owned by the region, not closed here).</summary>
    internal SafeFileHandle MemfdHandle(MemfdRegion region)
    {
        if (!_memfdHandles.TryGetValue(region, out var h))
            _memfdHandles[region] = h = new SafeFileHandle(region.Fd, ownsHandle: false);
        return h;
    }

    // ---------------------------------------------------------------- teardown

    /// <summary>
    /// Stops paging and leaves guest memory whole: stops the reader, writes swapped pages back into
    /// the memfd (faulters waiting on them find them there), unregisters (waking every faulter: they
    /// fault normally from now on) and closes the userfaultfd and the swap file (deleted on close).
    /// Best effort: called on stop and after a failure.
    /// </summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _reader?.Dispose();
        if (Swap is not null && Pmap is not null)
            for (var p = 0UL; p < Ram.Total; p++)
                if (Pmap.IsSwapped(p))
                    try { SwapInToMemfd(p); } catch (Exception) { break; }
        // Likewise a lazy restore's pages still in the file: guest memory stays whole without paging.
        if (Restore is { Closed: false } && Pmap is not null)
            for (var p = 0UL; p < Ram.Total; p++)
                if (IsPendingRestore(p))
                    try { RestoreInToMemfd(p); } catch (Exception) { break; }
        if (Uffd is not null)
        {
            foreach (var r in Ram.Ranges)
                try { Uffd.Unregister(r.GuestView, r.Pages * Page); } catch (Exception) { /* closing unregisters too */ }
            Uffd.Dispose();
        }
        Swap?.Dispose();
        Restore?.Dispose();
        foreach (var h in _memfdHandles.Values) h.Dispose();
        _memfdHandles.Clear();
        if (_zeroPage is not null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_zeroPage);
        System.Runtime.InteropServices.NativeMemory.AlignedFree(_bounce);
        _zeroPage = null;
    }
}
