using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Memory;
using static ActorVmm.Memory.PageSample;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// The swapper under TestKit's virtual scheduler: first with a probe standing in for the vmspace
/// (the protocol), then as the child of a real vmspace (memfd + userfaultfd; a host thread touching
/// the guest view stands in for a vcpu).
/// </summary>
public sealed class SwapperTests : TestKit
{
    private const string VirtualTime = "akka.scheduler.implementation = \"Akka.TestKit.TestScheduler, Akka.TestKit\"";
    private const ulong Page = 4096;
    private static readonly TimeSpan Interval = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    public SwapperTests() : base(VirtualTime) { }

    private TestScheduler Scheduler => (TestScheduler)Sys.Scheduler;

    /// <summary>Starts a swapper and waits until it has started (its timer is set in PreStart).</summary>
    private async Task<(IActorRef Swapper, TestProbe Vmspace)> StartSwapper(int coldScans = 2)
    {
        var vmspace = CreateTestProbe("vmspace");
        var swapper = Sys.ActorOf(SwapperProtocol.Props(vmspace, new SwapperProtocol.Options(Interval, coldScans)));
        await Stats(swapper);
        return (swapper, vmspace);
    }

    /// <summary>The vmspace's swapper child, once started (its timer is set).</summary>
    private async Task<IActorRef> SwapperOf(PagedVmspace vm)
    {
        var swapper = await Sys.ActorSelection(vm.Vmspace.Path / "swapper").ResolveOne(Wait);
        await Stats(swapper);
        return swapper;
    }

    private async Task<SampleAccessed> Tick(TestProbe vmspace)
    {
        Scheduler.Advance(Interval);
        return await vmspace.ExpectMsgAsync<SampleAccessed>(Wait);
    }

    /// <summary>One tick of a real vmspace's swapper, waited for until that scan is over: the
    /// swapper skips a tick while a page-out is still in flight, so the next tick must wait too.</summary>
    private async Task ScanAsync(IActorRef swapper, long scan)
    {
        Scheduler.Advance(Interval);
        await AwaitAssertAsync(async () =>
        {
            var s = await Stats(swapper);
            Assert.Equal((scan, false), (s.Scans, s.Busy));
        }, Wait);
    }

    private async Task<SwapperProtocol.Stats> Stats(IActorRef swapper)
    {
        swapper.Tell(SwapperProtocol.GetStats.Instance, TestActor);
        return await ExpectMsgAsync<SwapperProtocol.Stats>(Wait);
    }

    [Fact]
    public async Task Swapper_must_scan_on_every_tick_and_page_out_what_was_idle_for_cold_scans_scans()
    {
        var (swapper, vmspace) = await StartSwapper(coldScans: 2);
        await vmspace.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100)); // nothing before the first tick

        var s1 = await Tick(vmspace);
        swapper.Tell(new AccessedSample(s1.Id, [Resident | Accessed, Resident, Resident, None, Resident | Held], 4, 0, 1), vmspace);
        Assert.Equal(1, (await Stats(swapper)).Scans);
        await vmspace.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100)); // nothing idle for two scans yet

        var s2 = await Tick(vmspace);
        swapper.Tell(new AccessedSample(s2.Id, [Resident, Resident | Accessed, Resident, None, Resident | Held], 4, 0, 2), vmspace);
        var out2 = await vmspace.ExpectMsgAsync<PageOut>(Wait);
        Assert.Equal(s2.Id, out2.Id);
        Assert.Equal([2UL], out2.Pages);
        swapper.Tell(new PagedOut(out2.Id, 1, 3), vmspace);

        var s3 = await Tick(vmspace);
        swapper.Tell(new AccessedSample(s3.Id, [Resident, Resident, None, None, Resident | Held], 3, 0, 3), vmspace);
        var out3 = await vmspace.ExpectMsgAsync<PageOut>(Wait);
        Assert.Equal([0UL], out3.Pages);
        var stats = await Stats(swapper);
        Assert.Equal((3L, 2L, 1L), (stats.Scans, stats.Requested, stats.PagedOut));
    }

    [Fact]
    public async Task Swapper_must_keep_residency_below_the_vmspace_target_with_the_oldest_idle_pages()
    {
        var (swapper, vmspace) = await StartSwapper(coldScans: 5);
        var s1 = await Tick(vmspace);
        // Nothing is cold after one scan, but 6 are resident against a target of 4.
        swapper.Tell(new AccessedSample(s1.Id, [Resident, Resident | Accessed, Resident, Resident, Resident | Accessed, Resident], 6, 4, 1), vmspace);
        var pageOut = await vmspace.ExpectMsgAsync<PageOut>(Wait);
        Assert.Equal([0UL, 2UL], pageOut.Pages);
    }

    [Fact]
    public async Task Swapper_must_run_one_scan_at_a_time_and_go_on_after_a_refusal()
    {
        var (swapper, vmspace) = await StartSwapper();
        var s1 = await Tick(vmspace);
        Scheduler.Advance(Interval); // the vmspace has not answered: this tick is skipped
        await vmspace.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100));
        Assert.Equal(1, (await Stats(swapper)).Skipped);

        swapper.Tell(new Refused(s1.Id, "vmspace failed: test"), vmspace);
        var s2 = await Tick(vmspace);
        Assert.NotEqual(s1.Id, s2.Id);
        Assert.Equal("vmspace failed: test", (await Stats(swapper)).Refusal);
    }

    [Fact]
    public async Task Vmspace_swapper_must_swap_out_a_page_left_idle_for_cold_scans_and_keep_a_page_in_use()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20, coldScans: 2, scanInterval: Interval);
        var swapper = await SwapperOf(vm);
        const ulong idle = 0x10000, used = 0x20000;
        await vm.Guest(() =>
        {
            GuestAccess.Write(vm.Gva(idle), [0xAB, 0xCD]);
            GuestAccess.Write(vm.Gva(used), [1]);
        });
        for (var scan = 1; scan <= 3; scan++)
        {
            await vm.Guest(() => GuestAccess.ReadByte(vm.Gva(used))); // after a scan cleared A: a MINOR fault
            await ScanAsync(swapper, scan);
        }
        // Scan 1 saw both touched; scan 2 saw the idle page idle once, scan 3 twice: it goes.
        await AwaitAssertAsync(async () => Assert.Equal(1L, (await vm.Stats()).Paging.ScanPageOuts), Wait);
        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, idle, (used - idle) + Page));
        var bits = pm.Bits();
        Assert.NotEqual(0UL, pm.Entries[0] & bits.Swapped);
        Assert.NotEqual(0UL, pm.Entries[^1] & bits.Valid);
        var s = (await vm.Stats()).Paging;
        Assert.Equal((1L, 1UL, 1UL, Interval), (s.SwapOuts, s.SwappedPages, s.ResidentPages, s.ScanInterval));
        Assert.Equal(2L, s.MinorFaults); // the page in use, after scans 1 and 2 cleared its A

        byte[] back = [];
        await vm.Guest(() => back = GuestAccess.Read(vm.Gva(idle), 2));
        Assert.Equal(new byte[] { 0xAB, 0xCD }, back);
        Assert.Equal(1L, (await vm.Stats()).Paging.SwapIns);
    }

    [Fact]
    public async Task Vmspace_swapper_must_not_swap_a_held_page()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20, coldScans: 1, scanInterval: Interval);
        var swapper = await SwapperOf(vm);
        const ulong held = 0x30000, free = 0x31000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(held), [7, 7]));
        await vm.Guest(() => GuestAccess.Write(vm.Gva(free), [8]));
        var lease = (await vm.Ask<HoldGranted>(new Hold(1, held, Page))).Hold;
        for (var scan = 1; scan <= 3; scan++)
        {
            await ScanAsync(swapper, scan);
        }
        await AwaitAssertAsync(async () => Assert.Equal(1L, (await vm.Stats()).Paging.ScanPageOuts), Wait); // the free page only
        var pm = await vm.Ask<PmapEntries>(new GetPmap(2, held, 2 * Page));
        Assert.Equal((true, true), ((pm.Entries[0] & pm.Bits().Valid) != 0, (pm.Entries[1] & pm.Bits().Swapped) != 0));

        await vm.Ask<HoldReleased>(new Release(lease.HoldId));
        for (var scan = 4; scan <= 5; scan++)
        {
            await ScanAsync(swapper, scan);
        }
        await AwaitAssertAsync(async () => Assert.Equal(2L, (await vm.Stats()).Paging.ScanPageOuts), Wait);
        Assert.Equal(new byte[] { 7, 7 }, (await vm.Ask<MemoryData>(new ReadMemory(3, held, 2))).Data);
    }
}
