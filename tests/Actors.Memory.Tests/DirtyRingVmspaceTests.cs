using Akka.Actor;
using Akka.TestKit.Xunit2;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// A vmspace whose dirty bits come from vcpus' dirty rings (TestProbes stand in for the vcpus and
/// answer with the GFNs a harvest would give), and the pure model of what it keeps.
/// </summary>
public sealed class DirtyRingVmspaceTests : TestKit
{
    private const ulong OneMiB = 1 << 20;
    private const ulong Page = 4096;
    private const ulong Base = 0x10000; // RAM pages 16.. of the layout (RAM from gpa 0)
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(5);
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    private static ulong Gfn(ulong page) => (Base >> 12) + page;

    private static Task<PagedVmspace> RingVmspace(TestKit kit) =>
        PagedVmspace.StartAsync(kit, OneMiB, userfaultfd: false, dirtyTracking: DirtyTracking.DirtyRing);

    [Fact]
    public async Task Scan_must_wait_for_every_vcpu_to_harvest_and_report_what_they_harvested()
    {
        await using var vm = await RingVmspace(this);
        var v0 = CreateTestProbe("vcpu0");
        var v1 = CreateTestProbe("vcpu1");
        vm.Vmspace.Tell(new RegisterVcpu(0, v0));
        vm.Vmspace.Tell(new RegisterVcpu(1, v1));

        vm.Vmspace.Tell(new ScanAccessedDirty(1, Base, 4 * Page), TestActor);
        var g = (await v0.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        Assert.Equal(g, (await v1.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation);
        vm.Vmspace.Tell(new EptInvalidated(0, g, [Gfn(0)]));
        await ExpectNoMsgAsync(Quiet); // vcpu 1's ring is not harvested yet
        vm.Vmspace.Tell(new EptInvalidated(1, g, [Gfn(2), 0xF_FFFF])); // a GFN outside RAM is ignored
        var ad = await ExpectMsgAsync<AccessedDirty>(Wait);
        Assert.Equal([PageAD.Dirty, PageAD.None, PageAD.Dirty, PageAD.None], ad.Pages);

        var s = await vm.Stats();
        Assert.Equal(new DirtyStats("dirty-ring", 2, 0, 3), s.Dirty);
    }

    [Fact]
    public async Task Clear_must_drop_what_a_vcpu_reports_before_its_ack_and_keep_what_it_reports_after()
    {
        await using var vm = await RingVmspace(this);
        var v0 = CreateTestProbe("vcpu0");
        vm.Vmspace.Tell(new RegisterVcpu(0, v0));
        vm.Vmspace.Tell(new DirtyRingHarvested(0, [Gfn(0), Gfn(1)])); // a full ring, before any clear

        vm.Vmspace.Tell(new ClearDirty(1, Base, 2 * Page), TestActor);  // pages 0 and 1
        var g = (await v0.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        vm.Vmspace.Tell(new DirtyRingHarvested(0, [Gfn(1), Gfn(3)]));  // written before the clear reached vcpu 0
        await ExpectNoMsgAsync(Quiet);
        vm.Vmspace.Tell(new EptInvalidated(0, g, [Gfn(0)]));             // its last harvest before the clear
        Assert.Equal(new DirtyCleared(1, g), await ExpectMsgAsync<DirtyCleared>(Wait));
        vm.Vmspace.Tell(new DirtyRingHarvested(0, [Gfn(1)]));           // written after: kept

        vm.Vmspace.Tell(new ScanAccessedDirty(2, Base, 4 * Page), TestActor);
        var h = (await v0.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        vm.Vmspace.Tell(new EptInvalidated(0, h));
        var ad = await ExpectMsgAsync<AccessedDirty>(Wait);
        // page 0: cleared, not written since; page 1: written after the clear; page 3: outside the cleared range
        Assert.Equal([PageAD.None, PageAD.Dirty, PageAD.None, PageAD.Dirty], ad.Pages);
    }

    [Fact]
    public async Task A_host_write_is_dirty_until_cleared_and_a_held_page_stays_dirty()
    {
        await using var vm = await RingVmspace(this);
        Assert.IsType<MemoryWritten>(await vm.Ask<object>(new WriteMemory(1, Base + Page + 5, [1, 2])));
        Assert.IsType<HoldGranted>(await vm.Ask<object>(new Hold(2, Base + 2 * Page, Page)));
        var ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(3, Base, 3 * Page));
        Assert.Equal(PageAD.None, ad.Pages[0] & PageAD.Dirty);
        Assert.Equal(PageAD.Dirty, ad.Pages[1] & PageAD.Dirty);
        Assert.Equal(PageAD.Dirty, ad.Pages[2] & PageAD.Dirty);

        await vm.Ask<DirtyCleared>(new ClearDirty(4, Base, 3 * Page)); // no vcpus: completes at once
        ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(5, Base, 3 * Page));
        Assert.Equal([PageAD.None, PageAD.None, PageAD.Dirty], ad.Pages.Select(p => p & PageAD.Dirty));
    }

    [Fact]
    public async Task A_ring_found_full_makes_every_ram_page_dirty()
    {
        await using var vm = await RingVmspace(this);
        vm.Vmspace.Tell(new DirtyRingHarvested(0, [Gfn(1)], RingOverflowed: true));
        var ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(1, 0, OneMiB));
        Assert.All(ad.Pages, p => Assert.Equal(PageAD.Dirty, p & PageAD.Dirty));
        Assert.Equal(1, (await vm.Stats()).Dirty.RingOverflows);
    }

    [Fact]
    public void Model_orders_a_clear_against_each_vcpu_by_its_ack()
    {
        var log = new DirtyPageLog(128);
        log.Harvested(0, [1, 2, 100]);
        log.Clear(generation: 5, first: 0, count: 64, vcpus: [0, 1]);
        Assert.False(log.IsDirty(1));
        Assert.True(log.IsDirty(100));              // outside the range

        log.Harvested(0, [3, 70]);                  // before vcpu 0's ack: 3 dropped, 70 kept
        log.Acked(0, 5);
        log.Harvested(0, [4]);                      // after vcpu 0's ack: kept
        log.Harvested(1, [5]);                      // vcpu 1 has not acked: dropped
        Assert.Equal(1, log.PendingClears);
        log.Acked(1, 6);                            // a later generation covers 5
        Assert.Equal(0, log.PendingClears);
        log.Harvested(1, [6]);
        log.MarkDirty(7);

        var dirty = Enumerable.Range(0, 128).Where(p => log.IsDirty((ulong)p)).ToArray();
        Assert.Equal([4, 6, 7, 70, 100], dirty);
    }

    [Fact]
    public void Model_forgets_a_vcpu_that_left_so_no_clear_waits_for_it()
    {
        var log = new DirtyPageLog(8);
        log.Clear(1, 0, 8, [0, 1]);
        log.Acked(0, 1);
        log.Forget(1);
        Assert.Equal(0, log.PendingClears);
        log.Harvested(1, [2, 9]); // 9 is past the end: ignored
        Assert.True(log.IsDirty(2));
    }
}
