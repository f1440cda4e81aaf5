using ActorVmm.Memory;
using ActorVmm.LibVmm;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// The fault resolver's answer to a fault the kernel reports again after it was resolved (kvm_pvm does so
/// while a kicked vcpu waits for a fault: hundreds of reports of a page already mapped). Real
/// memfd and userfaultfd; the fills need no faulting thread (UFFDIO_ZEROPAGE fills ahead of one).
/// </summary>
public sealed class FaultResolverRetryTests
{
    private static readonly GuestPhysAddr Gpa = new(0x8000);

    private sealed class Clock
    {
        public long Ms;
        public long Now() => Ms;
    }

    [Fact]
    public void Pager_must_take_repeated_reports_of_a_mapped_page_as_duplicates_not_a_failure()
    {
        using var map = VmspaceLayout.Build(1 << 20);
        var clock = new Clock();
        using var pager = new GuestPager(map, VmspaceOptions.Paged(), clock.Now);

        pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);
        for (var i = 0; i < 500; i++)
        {
            clock.Ms += 1; // a burst over 0.5 s, as a vcpu with a signal pending produces
            pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);
        }

        Assert.Equal(501, pager.Faults.MissingFaults);
        Assert.Equal(1, pager.Faults.ZeroFills);
        Assert.Equal(500, pager.Faults.Retries);
        Assert.True(pager.Pmap.IsValid(pager.Ram.TryPage(Gpa, out var page) ? page : throw new InvalidOperationException()));
    }

    [Fact]
    public void Pager_must_give_up_on_a_fault_reported_without_progress_for_the_whole_window()
    {
        using var map = VmspaceLayout.Build(1 << 20);
        var clock = new Clock();
        using var pager = new GuestPager(map, VmspaceOptions.Paged(), clock.Now);
        pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);

        var e = Assert.Throws<VmspaceException>(() =>
        {
            for (var i = 0; i < 100_000; i++)
            {
                clock.Ms += 1; // 32 attempts are not enough: the reports must also span 10 s
                pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);
            }
        });
        Assert.Contains("gpa 0x8000", e.Message);
        Assert.Contains("not resolved", e.Message);
        Assert.Equal(10_001, clock.Ms); // the first retry came at 1 ms
    }

    [Fact]
    public void Pager_must_start_a_new_run_of_retries_after_a_quiet_gap()
    {
        using var map = VmspaceLayout.Build(1 << 20);
        var clock = new Clock();
        using var pager = new GuestPager(map, VmspaceOptions.Paged(), clock.Now);
        pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);

        // Bursts of duplicates, each after a quiet second, over a minute: never one run of 10 s.
        for (var burst = 0; burst < 30; burst++)
        {
            clock.Ms += 2_000;
            for (var i = 0; i < 40; i++)
            {
                clock.Ms += 1;
                pager.Faults.Resolve(Gpa, FaultKind.Missing, write: true);
            }
        }
        Assert.Equal(1_200, pager.Faults.Retries);
    }
}
