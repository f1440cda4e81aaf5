using System.Runtime.InteropServices;
using Akka.Actor;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// The VmspaceActor with real memfd memory and a real userfaultfd; host threads touching the guest
/// view stand in for vcpus (they fault exactly as KVM's accesses would, and wait in the kernel
/// until the actor resolves the fault).
/// </summary>
public sealed class VmspacePagingTests : TestKit
{
    private const ulong Page = 4096;
    private const ulong OneMiB = 1 << 20;
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    [Fact]
    public async Task Vmspace_must_fault_each_fresh_page_missing_once_and_read_zeros()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const int pages = 16;
        var pagesRead = new List<byte[]>();
        await vm.Guest(() =>
        {
            for (var i = 0UL; i < pages; i++) pagesRead.Add(GuestAccess.ReadPage(vm.Gva(0x40000 + i * Page)));
            for (var i = 0UL; i < pages; i++) GuestAccess.ReadByte(vm.Gva(0x40000 + i * Page + 100)); // mapped now: no fault
        });

        Assert.All(pagesRead, p => Assert.All(p, b => Assert.Equal(0, b)));
        var s = (await vm.Stats()).Paging;
        Assert.True(s.Enabled, s.Features);
        Assert.Equal((16L, 0L, 0L, 16L), (s.MissingFaults, s.MinorFaults, s.WriteProtectFaults, s.ZeroFills));
        Assert.Equal(16UL, s.ResidentPages);
        Assert.Equal(16 * Page, vm.Ram.AllocatedBytes);
    }

    [Fact]
    public async Task Vmspace_must_see_pages_a_loader_wrote_as_resident_and_map_them_on_a_minor_fault()
    {
        const ulong p = 0x7000;
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, load: map => map.Write(new GuestPhysAddr(p), [0xC3, 0x90]));
        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, p, Page));
        Assert.Equal(pm.Bits().Valid | pm.Bits().ReadWrite | pm.Bits().Modified | p, pm.Entries[0]); // resident, not mapped, not WP'd

        byte[] seen = [];
        await vm.Guest(() => seen = GuestAccess.Read(vm.Gva(p), 2));
        Assert.Equal(new byte[] { 0xC3, 0x90 }, seen);
        var s = (await vm.Stats()).Paging;
        Assert.Equal((0L, 1L, 1UL), (s.MissingFaults, s.MinorFaults, s.ResidentPages));
    }

    [Fact]
    public async Task Vmspace_must_resolve_one_page_faulted_by_two_threads_at_once()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var a = vm.Guest(() => GuestAccess.ReadByte(vm.Gva(0x8000)));
        var b = vm.Guest(() => GuestAccess.ReadByte(vm.Gva(0x8000)));
        await Task.WhenAll(a, b);
        var s = (await vm.Stats()).Paging;
        Assert.Equal(1L, s.ZeroFills);
        Assert.Equal(1UL, s.ResidentPages);
    }

    [Fact]
    public async Task Vmspace_must_report_A_for_a_read_page_and_A_and_D_for_a_written_one_again_after_clearing()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const ulong a = 0x10000, b = 0x11000;
        async Task ReadAWriteB() => await vm.Guest(() =>
        {
            GuestAccess.ReadByte(vm.Gva(a));
            GuestAccess.Write(vm.Gva(b), [1, 2, 3]);
        });

        await ReadAWriteB();
        var ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(1, a, 2 * Page));
        Assert.Equal([PageAD.Accessed, PageAD.Accessed | PageAD.Dirty], ad.Pages);

        var pm = await vm.Ask<PmapEntries>(new GetPmap(2, a, 2 * Page));
        var bits = pm.Bits();
        Assert.Equal((PmapType.Ept, true), (pm.Type, pm.Flags.EmulateAccessedDirty));
        Assert.Equal(bits.Valid | bits.ReadWrite | bits.Accessed | bits.Execute | a, pm.Entries[0]);           // resident, WP'd
        Assert.Equal(bits.Valid | bits.ReadWrite | bits.Accessed | bits.Execute | bits.Modified | b, pm.Entries[1]);

        Assert.Equal(3, (await vm.Ask<AccessedCleared>(new ClearAccessed(3, a, 2 * Page))).Id);
        Assert.Equal(4, (await vm.Ask<DirtyCleared>(new ClearDirty(4, a, 2 * Page))).Id);
        ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(5, a, 2 * Page));
        Assert.Equal([PageAD.None, PageAD.None], ad.Pages);

        await ReadAWriteB(); // both pages are in the memfd, unmapped: MINOR faults
        ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(6, a, 2 * Page));
        Assert.Equal([PageAD.Accessed, PageAD.Accessed | PageAD.Dirty], ad.Pages);
        var s = (await vm.Stats()).Paging;
        Assert.Equal((2L, 2L, 0L), (s.MissingFaults, s.MinorFaults, s.WriteProtectFaults));

        // Dirty only: A stays mapped but write-protected; the next write is a WP fault.
        await vm.Ask<DirtyCleared>(new ClearDirty(7, a, 2 * Page));
        await vm.Guest(() => GuestAccess.Write(vm.Gva(a), [9]));
        ad = await vm.Ask<AccessedDirty>(new ScanAccessedDirty(8, a, 2 * Page));
        Assert.Equal([PageAD.Accessed | PageAD.Dirty, PageAD.Accessed], ad.Pages);
        s = (await vm.Stats()).Paging;
        Assert.Equal((2L, 2L, 1L), (s.MissingFaults, s.MinorFaults, s.WriteProtectFaults));

        byte[] back = [];
        await vm.Guest(() => back = GuestAccess.ReadPage(vm.Gva(b)));
        Assert.Equal(new byte[] { 1, 2, 3, 0 }, back[..4]);
    }

    [Fact]
    public async Task Vmspace_with_an_x86_pmap_keeps_the_same_state_in_x86_bits()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, pmapType: PmapType.X86);
        await vm.Guest(() =>
        {
            GuestAccess.ReadByte(vm.Gva(0x1000));
            GuestAccess.Write(vm.Gva(0x2000), [1]);
        });
        var pm = await vm.Ask<PmapEntries>(new GetPmap(1, 0x1000, 2 * Page));
        Assert.Equal(PmapType.X86, pm.Type);
        Assert.Equal(0b0010_0011UL | 0x1000, pm.Entries[0]);  // P RW A
        Assert.Equal(0b0110_0011UL | 0x2000, pm.Entries[1]);  // P RW A D
    }

    [Fact]
    public async Task Vmspace_must_swap_a_written_page_out_and_fault_it_back_identical()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const ulong p = 0x20000;
        var pattern = Enumerable.Range(0, (int)Page).Select(i => (byte)(i * 7 + 3)).ToArray();
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), pattern));
        var before = vm.Ram.AllocatedBytes;

        var swapped = await vm.Ask<SwappedOut>(new SwapOut(1, p, Page));
        Assert.Equal(1, swapped.Pages);
        Assert.Equal(before - Page, vm.Ram.AllocatedBytes);
        var pm = await vm.Ask<PmapEntries>(new GetPmap(2, p, Page));
        Assert.Equal(pm.Bits().Swapped | pm.Bits().Modified, pm.Entries[0] & ~PmapBits.FrameMask);
        Assert.True(new FileInfo(vm.SwapFile).Length >= (long)(p + Page));

        // A device read does not bring it back (it reads the swap file).
        var data = await vm.Ask<MemoryData>(new ReadMemory(3, p, (int)Page));
        Assert.Equal(pattern, data.Data);
        Assert.Equal(before - Page, vm.Ram.AllocatedBytes);

        byte[] back = [];
        await vm.Guest(() => back = GuestAccess.ReadPage(vm.Gva(p)));
        Assert.Equal(pattern, back);
        Assert.Equal(before, vm.Ram.AllocatedBytes);
        var s = (await vm.Stats()).Paging;
        Assert.Equal((1L, 1L, 0UL), (s.SwapOuts, s.SwapIns, s.SwappedPages));
        Assert.Equal(2L, s.MissingFaults); // the first write, and the touch after the swap-out
    }

    [Fact]
    public async Task Vmspace_must_swap_in_before_a_device_writes_a_swapped_page()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const ulong p = 0x30000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), [1, 2, 3, 4]));
        await vm.Ask<SwappedOut>(new SwapOut(1, p, Page));
        await vm.Ask<MemoryWritten>(new WriteMemory(2, p + 2, [0xEE]));
        byte[] back = [];
        await vm.Guest(() => back = GuestAccess.ReadPage(vm.Gva(p)));
        Assert.Equal(new byte[] { 1, 2, 0xEE, 4 }, back[..4]);
        var s = (await vm.Stats()).Paging;
        Assert.Equal((1L, 1L), (s.SwapIns, s.MinorFaults)); // back in the memfd, then mapped by CONTINUE
    }

    [Fact]
    public async Task Vmspace_must_keep_32_MiB_written_through_an_8_MiB_resident_limit()
    {
        const ulong ram = 32 * OneMiB, limit = 8 * OneMiB;
        await using var vm = await PagedVmspace.StartAsync(this, ram, residentLimitBytes: limit, coldScans: 1);
        // Collections while guest threads wait in faults must not stall anything (see GuestAccess).
        using var stop = new CancellationTokenSource();
        var collector = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested) { GC.Collect(); await Task.Delay(20); }
        });
        static ulong Pattern(ulong page, int word) => (page << 20) ^ ((ulong)word * 0x9E37_79B9_7F4A_7C15UL);

        await vm.Guest(() =>
        {
            var words = new ulong[Page / 8];
            for (var page = 0UL; page < ram / Page; page++)
            {
                for (var i = 0; i < words.Length; i++) words[i] = Pattern(page, i);
                GuestAccess.Write(vm.Gva(page * Page), MemoryMarshal.AsBytes(words.AsSpan()));
            }
        }, timeoutMs: 30_000);
        var afterWrite = (await vm.Stats()).Paging;
        Assert.True(afterWrite.ResidentPages <= limit / Page, $"{afterWrite.ResidentPages} pages resident");
        Assert.True(vm.Ram.AllocatedBytes <= limit, $"{vm.Ram.AllocatedBytes} bytes allocated");

        var mismatches = 0L;
        var firstBad = new List<string>();
        await vm.Guest(() =>
        {
            for (var page = 0UL; page < ram / Page; page++)
            {
                var w = MemoryMarshal.Cast<byte, ulong>(GuestAccess.ReadPage(vm.Gva(page * Page)));
                for (var i = 0; i < w.Length; i++)
                    if (w[i] != Pattern(page, i))
                    {
                        mismatches++;
                        if (firstBad.Count < 8) firstBad.Add($"page {page} word {i}: 0x{w[i]:X} != 0x{Pattern(page, i):X}");
                    }
            }
        }, timeoutMs: 30_000);

        stop.Cancel();
        await collector;
        Assert.True(mismatches == 0, $"{mismatches} words differ: {string.Join("; ", firstBad)}");
        var s = (await vm.Stats()).Paging;
        Assert.True(s.SwapOuts >= (long)((ram - limit) / Page), $"swap-outs {s.SwapOuts}");
        Assert.True(s.SwapIns >= (long)((ram - limit) / Page), $"swap-ins {s.SwapIns}");
        Assert.True(s.ResidentPages <= limit / Page);
        Assert.True(vm.Ram.AllocatedBytes <= limit);
    }

    [Fact]
    public async Task Vmspace_must_not_swap_a_held_page_until_it_is_released()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const ulong p = 0x50000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), [42]));
        var granted = await vm.Ask<HoldGranted>(new Hold(1, p, Page));
        Assert.Equal(1, granted.Id);

        Assert.Equal(0, (await vm.Ask<SwappedOut>(new SwapOut(2, p, Page))).Pages);
        await vm.Ask<DirtyCleared>(new ClearDirty(3, p, Page));
        var pm = await vm.Ask<PmapEntries>(new GetPmap(4, p, Page));
        var e = pm.Entries[0];
        Assert.Equal((true, true, true), ((e & pm.Bits().Held) != 0, (e & pm.Bits().Valid) != 0, (e & pm.Bits().Modified) != 0));

        Assert.Equal(granted.Hold.HoldId, (await vm.Ask<HoldReleased>(new Release(granted.Hold.HoldId))).HoldId);
        Assert.Equal(1, (await vm.Ask<SwappedOut>(new SwapOut(5, p, Page))).Pages);
        Assert.Equal(5, (await vm.Ask<Refused>(new Release(5))).Id);
    }

    [Fact]
    public async Task Vmspace_must_fault_in_a_page_held_while_swapped_and_release_holds_of_a_stopped_holder()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        const ulong p = 0x60000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), [5]));
        await vm.Ask<SwappedOut>(new SwapOut(1, p, Page));

        var holder = CreateTestProbe();
        vm.Vmspace.Tell(new Hold(2, p, 2 * Page), holder);
        await holder.ExpectMsgAsync<HoldGranted>(Wait);
        Assert.Equal(2UL * Page, vm.Ram.AllocatedBytes); // swapped page back, empty page allocated
        Assert.Equal(5, vm.Ram.HostSpan(p, 1)[0]);
        Assert.Equal(2UL, (await vm.Stats()).Paging.HeldPages);

        Sys.Stop(holder);
        await AwaitAssertAsync(async () => Assert.Equal(0UL, (await vm.Stats()).Paging.HeldPages), Wait);
    }

    [Fact]
    public async Task Vmspace_must_refuse_ranges_outside_guest_RAM()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var r = await vm.Ask<Refused>(new ClearDirty(1, OneMiB, Page));
        Assert.Contains("guest RAM", r.Reason);
    }

    [Fact]
    public async Task Vmspace_without_userfaultfd_still_serves_memory_and_refuses_paging()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, userfaultfd: false);
        await vm.Ask<MemoryWritten>(new WriteMemory(1, 0x1000, [1, 2]));
        Assert.Equal(new byte[] { 1, 2 }, (await vm.Ask<MemoryData>(new ReadMemory(2, 0x1000, 2))).Data);
        Assert.Contains("paging is off", (await vm.Ask<Refused>(new SwapOut(3, 0, Page))).Reason);
        var pm = await vm.Ask<PmapEntries>(new GetPmap(4, 0x1000, Page));
        Assert.NotEqual(0UL, pm.Entries[0] & pm.Bits().Valid); // residency follows the memfd
        Assert.False((await vm.Stats()).Paging.Enabled);
    }

    [Fact]
    public async Task Vmspace_first_version_props_still_work()
    {
        using var map = VmspaceLayout.Build(OneMiB);
        var vmspace = Sys.ActorOf(VmspaceProtocol.Props(map));
        vmspace.Tell(new WriteMemory(1, 0x2000, [7]));
        await ExpectMsgAsync<MemoryWritten>(Wait);
        vmspace.Tell(GetStats.Instance);
        var s = await ExpectMsgAsync<Stats>(Wait);
        Assert.Equal((1L, false), (s.Writes, s.Paging.Enabled));
        var watcher = CreateTestProbe();
        watcher.Watch(vmspace);
        Sys.Stop(vmspace);
        await watcher.ExpectTerminatedAsync(vmspace, Wait);
    }

    [Fact]
    public async Task Vmspace_must_report_a_userfaultfd_failure_as_VmspaceFailed_and_keep_serving_memory()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        Assert.True((await vm.Stats()).Paging.Enabled); // registered
        // Someone remaps the guest view under the vmspace: the new mapping is not registered, so the
        // next userfaultfd ioctl on it fails (ENOENT) — a real ioctl error, not a fake.
        var mapped = TestNative.Mmap(vm.Ram.GuestView, (nuint)OneMiB, TestNative.PROT_NONE,
            TestNative.MAP_PRIVATE | TestNative.MAP_ANONYMOUS | TestNative.MAP_FIXED, -1, 0);
        Assert.Equal(vm.Ram.GuestView, mapped);

        vm.Vmspace.Tell(new ClearDirty(1, 0, Page), TestActor);
        var failed = await vm.Events.ExpectMsgAsync<VmspaceFailed>(Wait);
        Assert.Contains("UFFDIO_WRITEPROTECT", failed.Reason);
        Assert.Equal(1, (await ExpectMsgAsync<Refused>(Wait)).Id);

        Assert.Contains("failed", (await vm.Ask<Refused>(new SwapOut(2, 0, Page))).Reason);
        await vm.Ask<MemoryWritten>(new WriteMemory(3, 0x3000, [1]));
        Assert.Equal(new byte[] { 1 }, (await vm.Ask<MemoryData>(new ReadMemory(4, 0x3000, 1))).Data);
        var s = (await vm.Stats()).Paging;
        Assert.False(s.Enabled);
        Assert.Contains("UFFDIO_WRITEPROTECT", s.Failure);
        await vm.Events.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100)); // reported once
    }

    [Fact]
    public async Task Injected_page_fault_failure_fails_the_vmspace_on_the_named_page_only_and_wakes_the_faulter()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var armed = await vm.Ask<FaultProtocol.Injected>(new FaultProtocol.FailNestedPageFaults(1, 0x9123, "test"));
        Assert.Equal("the next 1 nested page fault(s) on the page of gpa 0x9123 will fail", armed.What);

        await vm.Guest(() => GuestAccess.ReadByte(vm.Gva(0x5000))); // another page: resolved as usual
        await vm.Events.ExpectNoMsgAsync(TimeSpan.FromMilliseconds(100));
        Assert.Equal(1L, (await vm.Stats()).Paging.MissingFaults);

        await vm.Guest(() => GuestAccess.Write(vm.Gva(0x9FF0), [7])); // the faulter is woken, not left hanging
        var failed = await vm.Events.ExpectMsgAsync<VmspaceFailed>(Wait);
        Assert.Matches(@"^Missing fault at gpa 0x9(000|FF0) \(write\) failed: injected fault: test$", failed.Reason);
        var s = (await vm.Stats()).Paging;
        Assert.False(s.Enabled);
        Assert.Equal(failed.Reason, s.Failure);
        Assert.Equal(new byte[] { 7 }, (await vm.Ask<MemoryData>(new ReadMemory(1, 0x9FF0, 1))).Data); // the write landed
        Assert.Contains("already failed", (await vm.Ask<FaultProtocol.NotInjected>(new FaultProtocol.FailNestedPageFaults(1, null, "again"))).Why);
    }

    [Fact]
    public async Task Page_fault_failure_is_refused_without_demand_paging_and_for_a_count_of_zero()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB, userfaultfd: false);
        Assert.Equal("this vmspace takes no nested page faults (demand paging is off)",
            (await vm.Ask<FaultProtocol.NotInjected>(new FaultProtocol.FailNestedPageFaults(1, null, "t"))).Why);
        Assert.Contains("fails nothing", (await vm.Ask<FaultProtocol.NotInjected>(new FaultProtocol.FailNestedPageFaults(0, null, "t"))).Why);
    }
}
