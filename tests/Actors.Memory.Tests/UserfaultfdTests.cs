using ActorVmm.LibVmm;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// LibVmm's <see cref="Userfaultfd"/> on a real memfd, without actors: the behaviours of this kernel
/// the vmspace relies on (see the comment on Userfaultfd and probe/uffd_probe.c). A thread touching
/// the guest view faults; the test thread reads the fault and resolves it.
/// </summary>
public sealed class UserfaultfdTests : IDisposable
{
    private const int Page = 4096;
    private readonly MemfdRegion _region = new("uffd-test", 16 * Page);
    private readonly Userfaultfd _uffd = Userfaultfd.Create();
    private readonly List<Task> _touchers = [];
    private bool _registered;

    private nint At(int page) => _region.GuestView + page * Page;

    private Task Touch(Action body)
    {
        var t = Task.Factory.StartNew(body, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
        _touchers.Add(t);
        return t;
    }

    private UffdFault NextFault()
    {
        Span<UffdFault> one = stackalloc UffdFault[1];
        var n = _uffd.ReadFaults(one, 5000);
        Assert.Equal(1, n);
        return one[0];
    }

    private UffdRangeIoctls RegisterAll()
    {
        _registered = true;
        return _uffd.Register(_region.GuestView, (ulong)(16 * Page),
            UffdRegisterMode.Missing | UffdRegisterMode.WriteProtect | UffdRegisterMode.Minor);
    }

    [Fact]
    public void This_kernel_offers_missing_minor_and_wp_on_shmem()
    {
        Assert.Equal(UffdFeatures.None, _uffd.Missing);
        Assert.Equal(UffdFeatures.ForShmemVmspace, _uffd.Enabled);
        Assert.True(_uffd.ThreadIds);
    }

    [Fact]
    public void Missing_wp_and_minor_register_together_on_one_shmem_vma()
    {
        var ioctls = RegisterAll();
        var needed = UffdRangeIoctls.Wake | UffdRangeIoctls.Copy | UffdRangeIoctls.ZeroPage |
                     UffdRangeIoctls.WriteProtect | UffdRangeIoctls.Continue;
        Assert.Equal(needed, ioctls & needed);
    }

    [Fact]
    public async Task Each_kind_of_fault_is_reported_and_resolved()
    {
        RegisterAll();

        // MISSING read → ZEROPAGE (works on shmem: allocates a zeroed page in the memfd).
        var t = Touch(() => Assert.Equal(0, GuestAccess.ReadByte(At(0))));
        var f = NextFault();
        Assert.Equal((FaultKind.Missing, false, (ulong)At(0)), (f.Kind, f.Write, f.Address));
        Assert.NotNull(f.ThreadId);
        Assert.Equal(UffdFill.Filled, _uffd.ZeroPage(At(0), Page));
        await t.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal((ulong)Page, _region.AllocatedBytes);

        // MISSING read → COPY with WP; then a write is a WP fault.
        t = Touch(() => GuestAccess.ReadByte(At(1)));
        Assert.Equal(FaultKind.Missing, NextFault().Kind);
        Assert.Equal(UffdFill.Filled, _uffd.Copy(At(1), new byte[Page], writeProtect: true));
        await t.WaitAsync(TimeSpan.FromSeconds(5));
        t = Touch(() => GuestAccess.Write(At(1), [7]));
        f = NextFault();
        Assert.Equal((FaultKind.WriteProtect, true), (f.Kind, f.Write));
        _uffd.WriteProtect(At(1), Page, protect: false);
        await t.WaitAsync(TimeSpan.FromSeconds(5));

        // MADV_DONTNEED keeps the page in the memfd: the next touch is MINOR; CONTINUE with WP keeps
        // dirty tracking armed (a plain CONTINUE would map it writable).
        _region.DropGuestMappings(Page, Page);
        t = Touch(() => Assert.Equal(7, GuestAccess.ReadByte(At(1))));
        f = NextFault();
        Assert.Equal((FaultKind.Minor, false), (f.Kind, f.Write));
        Assert.Equal(UffdFill.Filled, _uffd.Continue(At(1), Page, writeProtect: true));
        await t.WaitAsync(TimeSpan.FromSeconds(5));
        t = Touch(() => GuestAccess.Write(At(1), [8]));
        Assert.Equal(FaultKind.WriteProtect, NextFault().Kind);
        _uffd.WriteProtect(At(1), Page, protect: false);
        await t.WaitAsync(TimeSpan.FromSeconds(5));

        // Punching the page out of the memfd: the next touch is MISSING; CONTINUE says NoPage.
        _region.PunchHole(Page, Page);
        t = Touch(() => Assert.Equal(0x5A, GuestAccess.ReadByte(At(1))));
        Assert.Equal(FaultKind.Missing, NextFault().Kind);
        Assert.Equal(UffdFill.NoPage, _uffd.Continue(At(1), Page));
        var contents = new byte[Page];
        Array.Fill(contents, (byte)0x5A);
        Assert.Equal(UffdFill.Filled, _uffd.Copy(At(1), contents));
        await t.WaitAsync(TimeSpan.FromSeconds(5));

        // Filling a page that is already there is EEXIST, not an error.
        Assert.Equal(UffdFill.AlreadyMapped, _uffd.Copy(At(1), contents));
        Assert.Equal(UffdFill.AlreadyMapped, _uffd.ZeroPage(At(0), Page));
    }

    [Fact]
    public async Task Unregister_wakes_a_blocked_faulter_which_then_faults_normally()
    {
        RegisterAll();
        var t = Touch(() => GuestAccess.ReadByte(At(3)));
        Assert.Equal(FaultKind.Missing, NextFault().Kind);
        Assert.False(t.IsCompleted);
        _uffd.Unregister(_region.GuestView, 16 * Page);
        _registered = false;
        await t.WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public void An_ioctl_on_a_range_that_is_not_registered_fails_with_the_errno()
    {
        var e = Assert.Throws<UserfaultfdException>(() => _uffd.WriteProtect(At(0), Page, protect: true));
        Assert.Contains("UFFDIO_WRITEPROTECT", e.Message);
        Assert.NotEqual(0, e.Errno);
    }

    [Fact]
    public void Data_ranges_follow_allocation_and_punching()
    {
        _region.HostSpan(2 * Page, 3 * Page).Fill(1);
        _region.PunchHole(3 * Page, Page);
        Assert.Equal(2UL * Page, _region.AllocatedBytes);
        Assert.Equal([(2UL * Page, 1UL * Page), (4UL * Page, 1UL * Page)], _region.DataRanges(0, 16 * Page).ToArray());
    }

    public void Dispose()
    {
        if (_registered)
            try { _uffd.Unregister(_region.GuestView, 16 * Page); } catch (UserfaultfdException) { }
        try { Task.WhenAll(_touchers).Wait(TimeSpan.FromSeconds(5)); } catch (AggregateException) { }
        _uffd.Dispose();
        if (_touchers.All(t => t.IsCompleted)) _region.Dispose();
    }
}
