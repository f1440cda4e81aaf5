using ActorVmm.LibVmm;

namespace ActorVmm.Memory;

/// <summary>
/// Resolves the nested page faults userfaultfd reports on the guest view (userfaultfd(2),
/// ioctl_userfaultfd(2): UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_CONTINUE, UFFDIO_WRITEPROTECT), and so
/// emulates the accessed and dirty bits: A is set by the fault that maps a page, M by the write that
/// finds it write-protected.
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
/// The kernel is the truth: a fill that finds the page already there (EEXIST) or gone (EFAULT)
/// resyncs the entry and wakes the faulter, which faults again with the real kind if it must.
/// </para>
/// </summary>
internal sealed class FaultResolver(GuestPager pager, Func<long> clockMs)
{
    private const ulong Page = GuestPager.Page;
    private const int EINVAL = 22;
    // A fault is given up on only after both: this many fills that did not take, spread over at least
    // this long. The kernel may report one fault many times (measured on kvm_pvm: a vcpu kicked with a
    // signal while it waits for a fault re-reports it every ~20 µs, up to a few hundred times, until
    // KVM_RUN returns EINTR, even after the page was filled); a count alone would fail such a VM.
    private const int MaxRetriesPerPage = 32;
    private const long RetryWindowMs = 10_000;
    // A page whose retries stopped for this long starts a new run of retries.
    private const long RetryRunGapMs = 1_000;

    private readonly Dictionary<ulong, RetryRun> _retries = [];
    private bool _continueWp = true;

    public long MissingFaults, MinorFaults, WriteProtectFaults, ZeroFills, Retries;

    /// <summary>Retries of one page's fault: how many, since when, last when (milliseconds).</summary>
    private readonly record struct RetryRun(int Count, long FirstMs, long LastMs);

    private Pmap Pmap => pager.Pmap;
    private Userfaultfd Uffd => pager.Uffd!;

    /// <summary>Resolving a fault at <paramref name="gpa"/> would add a resident page.</summary>
    public bool Allocates(GuestPhysAddr gpa) => pager.Ram.TryPage(gpa, out var page) && !Pmap.IsValid(page);

    /// <summary>
    /// Resolves one nested page fault (the faulting thread waits in the kernel until this wakes it).
    /// The pmap decides how (a page swapped out after the fault was queued is swapped in whatever
    /// the reported kind); the kind is counted.
    /// </summary>
    public void Resolve(GuestPhysAddr gpa, FaultKind kind, bool write)
    {
        var uffd = pager.Uffd ?? throw new VmspaceException("a nested page fault arrived without userfaultfd");
        switch (kind)
        {
            case FaultKind.Missing: MissingFaults++; break;
            case FaultKind.Minor: MinorFaults++; break;
            case FaultKind.WriteProtect: WriteProtectFaults++; break;
        }
        if (!pager.Ram.TryPage(gpa, out var page)) throw new VmspaceException($"nested page fault at gpa {gpa} outside guest RAM");
        var address = pager.Ram.GuestAddress(page);

        UffdFill result;
        if (Pmap.IsSwapped(page)) result = SwapIn(page, address, write);
        else if (pager.IsPendingRestore(page)) result = RestoreIn(page, address, write);
        else if (!Pmap.IsValid(page)) result = ZeroFill(page, address, write);
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
            case UffdFill.AlreadyMapped when !Pmap.IsValid(page):
                if (Pmap.IsSwapped(page))
                    throw new VmspaceException($"gpa {gpa} is swapped out but the memfd has a page there");
                if (pager.IsPendingRestore(page))
                    throw new VmspaceException($"gpa {gpa} is still to be restored from the memory file but the memfd has a page there");
                Pmap.SetResident(page, pager.Ram.MemfdOffset(page), writable: true); // in the page cache
                break;
            case UffdFill.AlreadyMapped:
                Pmap.SetAccessed(page, true); // the kernel has it mapped: a duplicate report
                break;
            case UffdFill.NoPage:
                Pmap.SetEmpty(page); // no longer in the page cache: next time, demand zero
                break;
        }
        var now = clockMs();
        var run = _retries.TryGetValue(page, out var r) && now - r.LastMs < RetryRunGapMs
            ? r with { Count = r.Count + 1, LastMs = now }
            : new RetryRun(1, now, now);
        if (run.Count > MaxRetriesPerPage && now - run.FirstMs >= RetryWindowMs)
            throw new VmspaceException($"nested page fault at gpa {gpa} ({kind}) not resolved after {run.Count} attempts in {(now - run.FirstMs) / 1000} s ({result})");
        _retries[page] = run;
        uffd.Wake(address, Page);
    }

    /// <summary>The page left for the swap store: a fault on it starts a new run of retries.</summary>
    public void Forget(ulong page) => _retries.Remove(page);

    private UffdFill ZeroFill(ulong page, nint address, bool write)
    {
        // A read maps the page write-protected (ZEROPAGE has no WP mode; COPY of zeros has), so the
        // first write is seen; a write maps it writable and dirty at once. (M can survive from before
        // the page was lost: then it is mapped writable, as the pmap says.)
        var dirty = write || Pmap.IsModified(page) || !pager.TracksDirty;
        var r = !dirty ? Uffd.Copy(address, pager.ZeroPage, writeProtect: true)
            : pager.CanZeroPage ? Uffd.ZeroPage(address, Page)
            : Uffd.Copy(address, pager.ZeroPage);
        if (r != UffdFill.Filled) return r;
        ZeroFills++;
        Mapped(page, dirty);
        return r;
    }

    private UffdFill SwapIn(ulong page, nint address, bool write)
    {
        var bounce = pager.Bounce;
        pager.Swap!.Read(page, bounce);
        var dirty = write || Pmap.IsModified(page) || !pager.TracksDirty;
        var r = Uffd.Copy(address, bounce, writeProtect: !dirty);
        if (r != UffdFill.Filled) return r;
        pager.SwapIns++;
        Mapped(page, dirty);
        return r;
    }

    /// <summary>A lazy restore's page, first touched: its contents from the memory file (pread,
    /// UFFDIO_COPY), write-protected unless dirty, as a swap-in.</summary>
    private UffdFill RestoreIn(ulong page, nint address, bool write)
    {
        var bounce = pager.Bounce;
        pager.Restore!.Read(page, bounce);
        var dirty = write || Pmap.IsModified(page) || !pager.TracksDirty;
        var r = Uffd.Copy(address, bounce, writeProtect: !dirty);
        if (r != UffdFill.Filled) return r;
        pager.Restore.Taken(page);
        Mapped(page, dirty);
        return r;
    }

    private UffdFill MapCached(ulong page, nint address, bool write)
    {
        if (!pager.TracksAccessed) return UffdFill.NoPage; // no MINOR mode: a MISSING fault means the page is not there
        var dirty = write || Pmap.IsModified(page) || !pager.TracksDirty;
        var r = Continue(address, writeProtect: !dirty);
        if (r == UffdFill.Filled) Mapped(page, dirty);
        return r;
    }

    private UffdFill Unprotect(ulong page, nint address)
    {
        Uffd.WriteProtect(address, Page, protect: false); // wakes the writer
        Pmap.SetAccessed(page, true);
        Pmap.SetModified(page, true);
        return UffdFill.Filled;
    }

    private void Mapped(ulong page, bool dirty)
    {
        if (!Pmap.IsValid(page)) Pmap.SetResident(page, pager.Ram.MemfdOffset(page), writable: true);
        Pmap.SetAccessed(page, true);
        Pmap.SetModified(page, dirty || Pmap.IsModified(page));
        pager.Reclaimer.Touched(page);
    }

    /// <summary>CONTINUE, write-protected if asked; falls back to CONTINUE + WRITEPROTECT on kernels
    /// without UFFDIO_CONTINUE_MODE_WP (EINVAL), keeping the faulter asleep in between.</summary>
    private UffdFill Continue(nint address, bool writeProtect)
    {
        var uffd = Uffd;
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
}
