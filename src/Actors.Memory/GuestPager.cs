using System.Runtime.InteropServices;
using ActorVmm.LibVmm;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>An invariant of the vmspace's paging broke (the pmap and the kernel disagree beyond a race).</summary>
public sealed class VmspaceException(string message) : Exception(message);

/// <summary>
/// The paging half of the vmspace, without Akka: the pmap, the userfaultfd and its registration,
/// fault resolution (demand zero, swap-in, A/D emulation), clear/scan of A/D, the swap file, page
/// holds and the clock reclaimer. Owned and called by one actor: not thread-safe, except that the
/// kernel lets other threads fault while it works (they wait for the resolving ioctl).
/// <para>
/// Page states and how faults move between them (guest view = the userfaultfd-registered mapping):
/// <code>
///   empty ──MISSING read──▶ resident A, WP (COPY of zeros with MODE_WP)       M clear
///   empty ──MISSING write─▶ resident A, writable (ZEROPAGE)                   M set
///   resident, not mapped ──MINOR──▶ mapped (CONTINUE, MODE_WP unless M)       A set (+M on a write)
///   resident, mapped, WP ──WP write──▶ writable (WRITEPROTECT off)            M set
///   ClearAccessed: MADV_DONTNEED on the guest view → not mapped, A clear (WP markers survive)
///   ClearDirty:    WRITEPROTECT on → M clear
///   swap out:      zap guest view, write to the swap file, punch the memfd   → swapped
///   swapped ──MISSING──▶ resident (COPY of the saved page, MODE_WP unless M)  A set
/// </code>
/// Only vcpus (inside KVM_RUN) and native code may touch the guest view; managed code uses the
/// host view (see <see cref="Userfaultfd"/> on the GC deadlock otherwise).
/// The kernel is the truth: a fill that finds the page already there (EEXIST) or gone (EFAULT)
/// resyncs the entry and wakes the faulter, which faults again with the real kind if it must.
/// </para>
/// </summary>
internal sealed unsafe class GuestPager : IDisposable
{
    private const ulong Page = RamPages.PageSize;
    private const int EINVAL = 22;
    // A fault is given up on only after both: this many fills that did not take, spread over at least
    // this long. The kernel may report one fault many times (measured on kvm_pvm: a vcpu kicked with a
    // signal while it waits for a fault re-reports it every ~20 µs, up to a few hundred times, until
    // KVM_RUN returns EINTR, even after the page was filled); a count alone would fail such a VM.
    private const int MaxRetriesPerPage = 32;
    private const long RetryWindowMs = 10_000;
    // A page whose retries stopped for this long starts a new run of retries.
    private const long RetryRunGapMs = 1_000;
    private const ulong MaxIoRun = 256; // pages per swap write (1 MiB)

    private readonly GuestMemoryMap _memory;
    private readonly RamPages _ram;
    private readonly Pmap _pmap;
    private readonly Userfaultfd? _uffd;
    private UffdReader? _reader;
    private readonly SafeFileHandle? _swap;
    private readonly Dictionary<MemfdRegion, SafeFileHandle> _memfdHandles = [];
    private ulong _residentLimit;
    private readonly int _coldScans;
    private readonly byte[] _age;
    private ulong _clockHand;
    // Touched by the guest since the swapper's last sample (a fault mapped it): A alone would miss
    // a touch whose A bit the clock cleared again before the sample.
    private readonly bool[] _referenced;
    private readonly Dictionary<ulong, RetryRun> _retries = [];
    private readonly Func<long> _clockMs;
    private readonly Dictionary<ulong, int> _holdCounts = [];
    private byte* _zeroPage;
    private readonly byte* _bounce = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)Page, (nuint)Page);
    private bool _continueWp = true;
    private bool _disposed;

    /// <summary>Guest writes are tracked (uffd WP on shmem): dirty-bit emulation.</summary>
    public bool TracksDirty { get; }
    /// <summary>Guest touches after a clear are tracked (uffd MINOR on shmem): accessed-bit emulation.</summary>
    public bool TracksAccessed { get; }
    public bool Paging => _uffd is not null;
    public bool CanSwap => _uffd is not null && _swap is not null;
    public bool CanZeroPage { get; }
    public string Features { get; } = "userfaultfd off";
    /// <summary>Whether guest RAM can be superpage-backed here, and why (for stats and logs).</summary>
    public string Superpages { get; } = "";
    public Pmap Pmap => _pmap;
    public RamPages Ram => _ram;

    public long MissingFaults, MinorFaults, WriteProtectFaults, ZeroFills, SwapIns, SwapOuts, Retries, Reclaims;

    /// <summary>Retries of one page's fault: how many, since when, last when (milliseconds).</summary>
    private readonly record struct RetryRun(int Count, long FirstMs, long LastMs);

    /// <param name="clockMs">Milliseconds of a monotonic clock (tests pass their own); only for
    /// giving up on a fault that the kernel keeps reporting.</param>
    public GuestPager(GuestMemoryMap memory, VmspaceOptions options, Func<long>? clockMs = null)
    {
        _memory = memory;
        _clockMs = clockMs ?? (() => Environment.TickCount64);
        _ram = new RamPages(memory);
        _age = new byte[_ram.Total];
        _referenced = new bool[_ram.Total];
        _coldScans = Math.Clamp(options.ColdScans, 1, 255);
        _residentLimit = options.ResidentLimitBytes / Page;
        try
        {
            if (options.Userfaultfd)
            {
                _uffd = Userfaultfd.Create(UffdFeatures.ForShmemVmspace);
                if ((_uffd.Enabled & UffdFeatures.MissingShmem) == 0)
                    throw new UserfaultfdException($"this kernel cannot demand-page shmem: {_uffd.Describe()}");
                var mode = UffdRegisterMode.Missing;
                if ((_uffd.Enabled & UffdFeatures.WpShmem) != 0 && options.DirtyTracking == DirtyTracking.UffdWp) mode |= UffdRegisterMode.WriteProtect;
                if ((_uffd.Enabled & UffdFeatures.MinorShmem) != 0) mode |= UffdRegisterMode.Minor;
                var ioctls = ~UffdRangeIoctls.None;
                foreach (var r in _ram.Ranges) ioctls &= _uffd.Register(r.GuestView, r.Pages * Page, mode);
                if ((ioctls & (UffdRangeIoctls.Copy | UffdRangeIoctls.Wake)) != (UffdRangeIoctls.Copy | UffdRangeIoctls.Wake))
                    throw new UserfaultfdException($"registered guest RAM lacks UFFDIO_COPY/WAKE (range ioctls {ioctls})");
                TracksDirty = (mode & UffdRegisterMode.WriteProtect) != 0 && (ioctls & UffdRangeIoctls.WriteProtect) != 0;
                TracksAccessed = (mode & UffdRegisterMode.Minor) != 0 && (ioctls & UffdRangeIoctls.Continue) != 0;
                CanZeroPage = (ioctls & UffdRangeIoctls.ZeroPage) != 0;
                Features = $"{_uffd.Describe()}; registered {mode}; range ioctls {ioctls}" +
                           (TracksAccessed ? "" : "; no accessed-bit emulation (A reported set while resident)") +
                           (TracksDirty ? "" : "; no dirty-bit emulation (M reported set while resident)");
            }
            var flags = TracksAccessed && TracksDirty ? PmapFlags.UffdEmulated : PmapFlags.Untracked;
            (var superpages, Superpages) = SuperpageSupport(memory, _uffd is not null);
            _pmap = new Pmap(options.PmapType, flags with { Superpages = superpages }, _ram.Total);
            if (_uffd is not null && options.SwapFile is not null)
                _swap = File.OpenHandle(options.SwapFile, FileMode.Create, FileAccess.ReadWrite, FileShare.None, FileOptions.DeleteOnClose);
            if (_uffd is null) _residentLimit = 0;
            else if (_residentLimit > 0 && !CanSwap)
                throw new ArgumentException("a resident limit needs a swap file");
            ScanResidency();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    private byte* ZeroPage
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

    /// <summary>
    /// Marks the pages that already have contents in the memfd (a loader wrote them through the host
    /// view before the vmspace started). With accessed-bit emulation the guest view is zapped first,
    /// so A clear is true (the next touch is a MINOR fault); their history is unknown, so M is set
    /// (not write-protected; a dirty-page harvest must send them).
    /// </summary>
    private void ScanResidency()
    {
        if (TracksAccessed)
            foreach (var r in _ram.Ranges)
                r.Backing.DropGuestMappings(r.Segment.BackingOffset, r.Pages * Page);
        foreach (var r in _ram.Ranges)
            foreach (var (offset, length) in r.Backing.DataRanges(r.Segment.BackingOffset, r.Pages * Page))
            {
                var first = r.FirstPage + (offset - r.Segment.BackingOffset) / Page;
                for (var p = first; p < first + length / Page; p++)
                {
                    _pmap.SetResident(p, _ram.MemfdOffset(p), writable: true);
                    _pmap.SetAccessed(p, !TracksAccessed);
                    _pmap.SetModified(p, true);
                }
            }
    }

    /// <summary>Without fault tracking the pmap can only follow the memfd: refresh V from it, and
    /// PS from the host's page tables.</summary>
    public void RefreshUntracked()
    {
        if (Paging) return;
        for (var p = 0UL; p < _ram.Total; p++)
            if (_pmap.IsValid(p)) _pmap.SetEmpty(p);
        ScanResidency();
        RefreshSuperpages();
    }

    /// <summary>
    /// Superpages (issue 4 item 8; FreeBSD's pm_flags PMAP_PDE_SUPERPAGE): only without
    /// userfaultfd, and only where the RAM memfd was advised MADV_HUGEPAGE (which it is only if the
    /// host's shmem THP setting allows huge pages). With userfaultfd there are none, whatever the
    /// host allows: shmem raises the MISSING fault before it would allocate a huge page, the fills
    /// (UFFDIO_COPY/ZEROPAGE) allocate 4 KiB pages, and UFFDIO_CONTINUE maps one 4 KiB PTE (measured
    /// behaviour of Linux 6.x mm/shmem.c and mm/userfaultfd.c).
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
        if (!_pmap.Flags.Superpages) return;
        var huge = new bool[_ram.Total];
        foreach (var r in _ram.Ranges)
        {
            if (!HugeMappings.TryScan(r.GuestView, r.Pages * Page, out var runs, out var error))
                throw new VmspaceException($"cannot learn which guest RAM is superpage-backed: {error}");
            foreach (var (offset, length) in runs)
                for (var p = r.FirstPage + offset / Page; p < r.FirstPage + (offset + length) / Page && p < r.FirstPage + r.Pages; p++)
                    huge[p] = true;
        }
        for (var p = 0UL; p < _ram.Total; p++)
            if (huge[p] != _pmap.IsSuperpage(p)) _pmap.SetSuperpage(p, huge[p]);
    }

    /// <summary>Starts the reader thread; faults go to <paramref name="onFault"/> as guest-physical addresses.</summary>
    public void StartReader(Action<ulong, FaultKind, bool> onFault, Action<Exception> onError)
    {
        if (_uffd is null) return;
        _reader = new UffdReader(_uffd, f =>
        {
            if (_ram.TryGpaOfGuestAddress(f.Address, out var gpa)) onFault(gpa, f.Kind, f.Write);
            else onError(new VmspaceException($"userfaultfd fault at host address 0x{f.Address:X} is in no RAM segment"));
        }, onError, "vmspace-uffd");
    }

    // ---------------------------------------------------------------- faults

    /// <summary>
    /// Resolves one nested page fault (the faulting thread waits in the kernel until this wakes it).
    /// The pmap decides how (a page swapped out after the fault was queued is swapped in whatever
    /// the reported kind); the kind is counted.
    /// </summary>
    public void Resolve(ulong gpa, FaultKind kind, bool write)
    {
        var uffd = _uffd ?? throw new VmspaceException("a nested page fault arrived without userfaultfd");
        switch (kind)
        {
            case FaultKind.Missing: MissingFaults++; break;
            case FaultKind.Minor: MinorFaults++; break;
            case FaultKind.WriteProtect: WriteProtectFaults++; break;
        }
        if (!_ram.TryPage(gpa, out var page)) throw new VmspaceException($"nested page fault at gpa 0x{gpa:X} outside guest RAM");
        var address = _ram.GuestAddress(page);

        UffdFill result;
        if (_pmap.IsSwapped(page)) result = SwapIn(page, address, write);
        else if (!_pmap.IsValid(page)) result = ZeroFill(page, address, write);
        else if (kind == FaultKind.WriteProtect) result = Unprotect(page, address);
        else result = MapCached(page, address, write);

        if (result == UffdFill.Filled)
        {
            _retries.Remove(page);
            return;
        }
        // A race with the kernel's view: resync the entry, wake the faulter; it faults again if the
        // page still is not usable, with the kind the kernel now sees.
        Retries++;
        switch (result)
        {
            case UffdFill.AlreadyMapped when !_pmap.IsValid(page):
                if (_pmap.IsSwapped(page))
                    throw new VmspaceException($"gpa 0x{gpa:X} is swapped out but the memfd has a page there");
                _pmap.SetResident(page, _ram.MemfdOffset(page), writable: true); // in the page cache
                break;
            case UffdFill.AlreadyMapped:
                _pmap.SetAccessed(page, true); // the kernel has it mapped: a duplicate report
                break;
            case UffdFill.NoPage:
                _pmap.SetEmpty(page); // no longer in the page cache: next time, demand zero
                break;
        }
        var now = _clockMs();
        var run = _retries.TryGetValue(page, out var r) && now - r.LastMs < RetryRunGapMs
            ? r with { Count = r.Count + 1, LastMs = now }
            : new RetryRun(1, now, now);
        if (run.Count > MaxRetriesPerPage && now - run.FirstMs >= RetryWindowMs)
            throw new VmspaceException($"nested page fault at gpa 0x{gpa:X} ({kind}) not resolved after {run.Count} attempts in {(now - run.FirstMs) / 1000} s ({result})");
        _retries[page] = run;
        uffd.Wake(address, Page);
    }

    private UffdFill ZeroFill(ulong page, nint address, bool write)
    {
        // A read maps the page write-protected (ZEROPAGE has no WP mode; COPY of zeros has), so the
        // first write is seen; a write maps it writable and dirty at once. (M can survive from before
        // the page was lost: then it is mapped writable, as the pmap says.)
        var dirty = write || _pmap.IsModified(page) || !TracksDirty;
        var r = !dirty ? _uffd!.Copy(address, new ReadOnlySpan<byte>(ZeroPage, (int)Page), writeProtect: true)
            : CanZeroPage ? _uffd!.ZeroPage(address, Page)
            : _uffd!.Copy(address, new ReadOnlySpan<byte>(ZeroPage, (int)Page));
        if (r != UffdFill.Filled) return r;
        ZeroFills++;
        Mapped(page, dirty);
        return r;
    }

    private UffdFill SwapIn(ulong page, nint address, bool write)
    {
        var bounce = new Span<byte>(_bounce, (int)Page);
        ReadSwap(page, bounce);
        var dirty = write || _pmap.IsModified(page) || !TracksDirty;
        var r = _uffd!.Copy(address, bounce, writeProtect: !dirty);
        if (r != UffdFill.Filled) return r;
        SwapIns++;
        Mapped(page, dirty);
        return r;
    }

    private UffdFill MapCached(ulong page, nint address, bool write)
    {
        if (!TracksAccessed) return UffdFill.NoPage; // no MINOR mode: a MISSING fault means the page is not there
        var dirty = write || _pmap.IsModified(page) || !TracksDirty;
        var r = Continue(address, writeProtect: !dirty);
        if (r == UffdFill.Filled) Mapped(page, dirty);
        return r;
    }

    private UffdFill Unprotect(ulong page, nint address)
    {
        _uffd!.WriteProtect(address, Page, protect: false); // wakes the writer
        _pmap.SetAccessed(page, true);
        _pmap.SetModified(page, true);
        return UffdFill.Filled;
    }

    private void Mapped(ulong page, bool dirty)
    {
        if (!_pmap.IsValid(page)) _pmap.SetResident(page, _ram.MemfdOffset(page), writable: true);
        _pmap.SetAccessed(page, true);
        _pmap.SetModified(page, dirty || _pmap.IsModified(page));
        _age[page] = 0;
        _referenced[page] = true;
    }

    /// <summary>CONTINUE, write-protected if asked; falls back to CONTINUE + WRITEPROTECT on kernels
    /// without UFFDIO_CONTINUE_MODE_WP (EINVAL), keeping the faulter asleep in between.</summary>
    private UffdFill Continue(nint address, bool writeProtect)
    {
        var uffd = _uffd!;
        if (!writeProtect) return uffd.Continue(address, Page);
        if (_continueWp)
        {
            try { return uffd.Continue(address, Page, writeProtect: true); }
            catch (UserfaultfdException e) when (e.Errno == EINVAL) { _continueWp = false; }
        }
        var r = uffd.Continue(address, Page, writeProtect: false, wake: false);
        if (r != UffdFill.Filled) return r;
        uffd.WriteProtect(address, Page, protect: true);
        uffd.Wake(address, Page);
        return r;
    }

    // ---------------------------------------------------------------- A/D

    /// <summary>Clears A: drops the guest-view mappings so the next touch is a MINOR fault. False if
    /// accessed-bit emulation is unavailable (A stays set).</summary>
    public bool ClearAccessed(ulong first, ulong count)
    {
        if (!TracksAccessed) return false;
        foreach (var (r, f, n) in _ram.Runs(first, count))
            r.Backing.DropGuestMappings(r.Segment.BackingOffset + (f - r.FirstPage) * Page, n * Page);
        for (var p = first; p < first + count; p++) _pmap.SetAccessed(p, false);
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
        if (!_pmap.IsValid(page)) return;
        if (TracksAccessed)
        {
            ClearAccessed(page, 1);
            return;
        }
        _ram.RangeOf(page).Backing.DropGuestMappings(_ram.MemfdOffset(page), Page);
    }

    /// <summary>Clears M: write-protects the guest view so the next write is a WP fault. Held pages
    /// are skipped (never write-protected under a holder; they stay dirty). False if dirty-bit
    /// emulation is unavailable.</summary>
    public bool ClearDirty(ulong first, ulong count)
    {
        if (!TracksDirty) return false;
        var pages = new List<ulong>();
        for (var p = first; p < first + count; p++)
            if (!_pmap.IsHeld(p)) pages.Add(p);
        foreach (var (r, f, n) in _ram.Coalesce(pages))
        {
            _uffd!.WriteProtect(r.GuestView + (nint)((f - r.FirstPage) * Page), n * Page, protect: true);
            for (var p = f; p < f + n; p++) _pmap.SetModified(p, false);
        }
        return true;
    }

    public PageAD[] Scan(ulong first, ulong count)
    {
        var result = new PageAD[count];
        for (var i = 0UL; i < count; i++) result[i] = _pmap.AccessedDirty(first + i);
        return result;
    }

    // ---------------------------------------------------------------- swap

    private ulong SwapOffset(ulong page) => page * Page; // a direct-mapped, sparse swap file

    private void ReadSwap(ulong page, Span<byte> into)
    {
        var n = RandomAccess.Read(_swap!, into, (long)SwapOffset(page));
        if (n != into.Length) throw new VmspaceException($"swap file: short read of page {page} ({n} bytes)");
    }

    /// <summary>Swaps out the resident, unheld pages among [first, first+count); returns how many.</summary>
    public int SwapOut(ulong first, ulong count)
    {
        var victims = new List<ulong>();
        for (var p = first; p < first + count; p++)
            if (_pmap.IsValid(p) && !_pmap.IsHeld(p)) victims.Add(p);
        SwapOutPages(victims);
        return victims.Count;
    }

    /// <summary>
    /// For each run: zap the guest view first (from then on a guest touch faults and waits for this
    /// actor), save the contents, punch them out of the memfd. With KVM the zap also reaches the EPT
    /// (mmu notifiers) before madvise returns.
    /// </summary>
    private void SwapOutPages(List<ulong> sortedPages)
    {
        if (!CanSwap) throw new VmspaceException("swapping needs userfaultfd and a swap file");
        for (var i = 0; i < sortedPages.Count; i++)
            if (!_pmap.IsValid(sortedPages[i]) || (i > 0 && sortedPages[i] <= sortedPages[i - 1]))
                throw new VmspaceException($"swap-out of page {sortedPages[i]}: not resident, or listed twice");
        foreach (var (r, f, n) in _ram.Coalesce(sortedPages, MaxIoRun))
        {
            var offset = r.Segment.BackingOffset + (f - r.FirstPage) * Page;
            var length = n * Page;
            r.Backing.DropGuestMappings(offset, length);
            RandomAccess.Write(_swap!, r.Backing.HostSpan(offset, (int)length), (long)SwapOffset(f));
            r.Backing.PunchHole(offset, length);
            for (var p = f; p < f + n; p++)
            {
                _pmap.SetSwapped(p, SwapOffset(p));
                _retries.Remove(p);
            }
            SwapOuts += (long)n;
        }
    }

    /// <summary>Brings a swapped page back into the memfd (not into the guest view: its next guest
    /// touch is a MINOR fault), for host-side access.</summary>
    private void SwapInToMemfd(ulong page)
    {
        var bounce = new Span<byte>(_bounce, (int)Page);
        ReadSwap(page, bounce);
        var r = _ram.RangeOf(page);
        RandomAccess.Write(MemfdHandle(r.Backing), bounce, (long)_ram.MemfdOffset(page));
        _pmap.SetResident(page, _ram.MemfdOffset(page), writable: true);
        _pmap.SetAccessed(page, false);
        _age[page] = 0;
        SwapIns++;
    }

    private SafeFileHandle MemfdHandle(MemfdRegion region)
    {
        if (!_memfdHandles.TryGetValue(region, out var h))
            _memfdHandles[region] = h = new SafeFileHandle(region.Fd, ownsHandle: false);
        return h;
    }

    /// <summary>The resident limit in pages (0 = none).</summary>
    public ulong ResidentLimitPages => _residentLimit;

    /// <summary>Resident pages reclaim frees down to: 7/8 of the limit, so it runs in batches (0 = no limit).</summary>
    public ulong ReclaimTargetPages => _residentLimit == 0 ? 0 : _residentLimit - Math.Max(1, _residentLimit / 8);

    /// <summary>Resolving a fault at <paramref name="gpa"/> would add a resident page.</summary>
    public bool FaultAllocates(ulong gpa) => _ram.TryPage(gpa, out var page) && !_pmap.IsValid(page);

    /// <summary>
    /// Direct reclaim, the clock: while resident pages (plus <paramref name="reserve"/> about to
    /// become resident) exceed the limit, sweep the hand over guest RAM; a resident, unheld page
    /// with A set gets A cleared (its guest mapping dropped) and its age reset; one with A clear
    /// ages, and after <c>ColdScans</c> sweeps without a touch it is swapped out. Frees down to
    /// <see cref="ReclaimTargetPages"/>. Returns the pages swapped out. (The swapper actor ages pages
    /// periodically instead, so that this rarely has to run.)
    /// </summary>
    public int Reclaim(ulong reserve = 0)
    {
        if (_residentLimit == 0 || _pmap.ResidentPages + reserve <= _residentLimit) return 0;
        Reclaims++;
        var target = ReclaimTargetPages;
        var need = _pmap.ResidentPages + reserve - target;
        var victims = new HashSet<ulong>(); // the hand may lap within one call: choose a page once
        var cleared = new List<ulong>();
        var total = _ram.Total;
        for (var scanned = 0UL; (ulong)victims.Count < need && scanned < total * (ulong)(_coldScans + 1); scanned++)
        {
            var p = _clockHand;
            _clockHand = (p + 1) % total;
            if (!_pmap.IsValid(p) || _pmap.IsHeld(p) || victims.Contains(p)) continue;
            if (TracksAccessed && _pmap.IsAccessed(p))
            {
                _pmap.SetAccessed(p, false);
                _age[p] = 0;
                cleared.Add(p);
            }
            else if (++_age[p] >= _coldScans)
            {
                victims.Add(p);
            }
        }
        cleared.Sort();
        foreach (var (r, f, n) in _ram.Coalesce(cleared))
            r.Backing.DropGuestMappings(r.Segment.BackingOffset + (f - r.FirstPage) * Page, n * Page);
        var sorted = victims.ToList();
        sorted.Sort();
        SwapOutPages(sorted);
        return sorted.Count;
    }

    // ---------------------------------------------------------------- swapper

    /// <summary>
    /// One A-bit scan for the swapper: per page, resident / accessed since the last scan (A set, or
    /// a fault mapped it) / held; then A is cleared on every resident, unheld page that had it (its
    /// guest mapping dropped: the next touch is a MINOR fault) and the scan starts over. Without
    /// accessed-bit emulation A cannot be cleared, so every resident page reads as accessed.
    /// Returns whether any mapping was dropped (running vcpus must then see the change).
    /// </summary>
    public PageSample[] SampleAccessed(out bool cleared)
    {
        var sample = new PageSample[_ram.Total];
        var clear = new List<ulong>();
        for (var p = 0UL; p < _ram.Total; p++)
        {
            if (!_pmap.IsValid(p))
            {
                _referenced[p] = false;
                continue;
            }
            var s = PageSample.Resident;
            var accessed = _pmap.IsAccessed(p);
            if (accessed || _referenced[p]) s |= PageSample.Accessed;
            if (_pmap.IsHeld(p)) s |= PageSample.Held;
            else if (accessed && TracksAccessed) clear.Add(p);
            _referenced[p] = false;
            sample[p] = s;
        }
        foreach (var (r, f, n) in _ram.Coalesce(clear))
        {
            r.Backing.DropGuestMappings(r.Segment.BackingOffset + (f - r.FirstPage) * Page, n * Page);
            for (var p = f; p < f + n; p++) _pmap.SetAccessed(p, false);
        }
        cleared = clear.Count > 0;
        return sample;
    }

    /// <summary>
    /// Swaps out those of <paramref name="pages"/> (the swapper's victims) that are still resident,
    /// unheld and untouched since the last <see cref="SampleAccessed"/>; a page the guest touched in
    /// the meantime stays. Returns how many went.
    /// </summary>
    public int PageOut(IEnumerable<ulong> pages)
    {
        if (!CanSwap) throw new VmspaceException("paging out needs userfaultfd and a swap file");
        var victims = new List<ulong>();
        foreach (var p in pages.Where(p => p < _ram.Total).Distinct().Order())
            if (_pmap.IsValid(p) && !_pmap.IsHeld(p) && !_pmap.IsAccessed(p) && !_referenced[p]) victims.Add(p);
        SwapOutPages(victims);
        return victims.Count;
    }

    // ---------------------------------------------------------------- holds

    /// <summary>
    /// Pins pages for host-side (device) access: swapped pages come back into the memfd, empty ones
    /// are allocated (vm_gpa_hold faults the page in), and the guest view is un-write-protected:
    /// a holder writes through the host view, which no fault sees, so held pages count as dirty.
    /// </summary>
    public void Hold(ulong first, ulong count)
    {
        var unprotect = new List<ulong>();
        for (var p = first; p < first + count; p++)
        {
            if (_pmap.IsSwapped(p)) SwapInToMemfd(p);
            else if (!_pmap.IsValid(p))
            {
                // pwrite of zeros, not fallocate: a fallocated page that was never written reads as a
                // hole to SEEK_DATA (measured), and the pmap's "valid" must match what the memfd says.
                RandomAccess.Write(MemfdHandle(_ram.RangeOf(p).Backing), new ReadOnlySpan<byte>(ZeroPage, (int)Page), (long)_ram.MemfdOffset(p));
                _pmap.SetResident(p, _ram.MemfdOffset(p), writable: true);
                _pmap.SetAccessed(p, !TracksAccessed);
            }
            if (!_pmap.IsModified(p)) unprotect.Add(p);
            _pmap.SetModified(p, true);
            _holdCounts[p] = _holdCounts.GetValueOrDefault(p) + 1;
            _pmap.SetHeld(p, true);
        }
        if (TracksDirty)
            foreach (var (r, f, n) in _ram.Coalesce(unprotect))
                _uffd!.WriteProtect(r.GuestView + (nint)((f - r.FirstPage) * Page), n * Page, protect: false);
    }

    public void Unhold(ulong first, ulong count)
    {
        for (var p = first; p < first + count; p++)
        {
            var c = _holdCounts.GetValueOrDefault(p) - 1;
            if (c > 0) _holdCounts[p] = c;
            else
            {
                _holdCounts.Remove(p);
                _pmap.SetHeld(p, false);
            }
        }
    }

    public ulong HeldPages => (ulong)_holdCounts.Count;

    // ---------------------------------------------------------------- host-side access

    /// <summary>Reads guest memory for a device or tool without disturbing paging: swapped pages
    /// come from the swap file, holes read as zeros without being allocated (pread on the memfd).</summary>
    public bool TryRead(ulong gpa, Span<byte> destination)
    {
        if (!_memory.IsMapped(new GuestPhysAddr(gpa), (ulong)destination.Length)) return false;
        var done = 0;
        while (done < destination.Length)
        {
            var a = gpa + (ulong)done;
            var n = (int)Math.Min((ulong)(destination.Length - done), Page - (a & (Page - 1)));
            var chunk = destination.Slice(done, n);
            if (!_ram.TryPage(a, out var page)) _memory.Read(new GuestPhysAddr(a), chunk);
            else if (_pmap.IsSwapped(page))
            {
                var bounce = new Span<byte>(_bounce, (int)Page);
                ReadSwap(page, bounce);
                bounce.Slice((int)(a & (Page - 1)), n).CopyTo(chunk);
            }
            else
            {
                var r = _ram.RangeOf(page);
                var got = RandomAccess.Read(MemfdHandle(r.Backing), chunk, (long)(_ram.MemfdOffset(page) + (a & (Page - 1))));
                if (got != n) throw new VmspaceException($"pread of guest memory at 0x{a:X} returned {got} of {n} bytes");
            }
            done += n;
        }
        return true;
    }

    /// <summary>Writes guest memory for a device or tool: swapped pages come back first, written pages
    /// become resident and dirty (and lose their write protection, as the guest would).</summary>
    public bool TryWrite(ulong gpa, ReadOnlySpan<byte> source)
    {
        if (!_memory.IsMapped(new GuestPhysAddr(gpa), (ulong)source.Length)) return false;
        var unprotect = new List<ulong>();
        var end = gpa + (ulong)source.Length;
        for (var pa = gpa & ~(Page - 1); source.Length > 0 && pa < end; pa += Page)
        {
            if (!_ram.TryPage(pa, out var page)) continue;
            if (_pmap.IsSwapped(page)) SwapInToMemfd(page);
            else if (!_pmap.IsValid(page))
            {
                _pmap.SetResident(page, _ram.MemfdOffset(page), writable: true);
                _pmap.SetAccessed(page, !TracksAccessed);
            }
            if (!_pmap.IsModified(page)) unprotect.Add(page);
            _pmap.SetModified(page, true);
        }
        _memory.Write(new GuestPhysAddr(gpa), source);
        if (TracksDirty)
            foreach (var (r, f, n) in _ram.Coalesce(unprotect))
                _uffd!.WriteProtect(r.GuestView + (nint)((f - r.FirstPage) * Page), n * Page, protect: false);
        return true;
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
        if (_swap is not null && _pmap is not null)
            for (var p = 0UL; p < _ram.Total; p++)
                if (_pmap.IsSwapped(p))
                    try { SwapInToMemfd(p); } catch (Exception) { break; }
        if (_uffd is not null)
        {
            foreach (var r in _ram.Ranges)
                try { _uffd.Unregister(r.GuestView, r.Pages * Page); } catch (Exception) { /* closing unregisters too */ }
            _uffd.Dispose();
        }
        _swap?.Dispose();
        foreach (var h in _memfdHandles.Values) h.Dispose();
        _memfdHandles.Clear();
        if (_zeroPage is not null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_zeroPage);
        System.Runtime.InteropServices.NativeMemory.AlignedFree(_bounce);
        _zeroPage = null;
    }
}
