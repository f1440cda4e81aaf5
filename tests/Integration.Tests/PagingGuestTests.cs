using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>Real guests on demand-paged memory (userfaultfd nested page faults).</summary>
public sealed class PagingGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Page = 4096;
    private static readonly TimeSpan Ask = TimeSpan.FromSeconds(10);

    private static async Task<VmspaceProtocol.PagingStats> Paging(GuestRun run)
    {
        var vmspace = await run.ResolveChild("vmspace");
        return (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Ask)).Paging;
    }



    /// <summary>Guest code: debug-exit with status <paramref name="value"/> (exit code 2 × value + 1).</summary>
    private static void Exit(Assembler a, byte value)
    {
        a.mov(al, value);
        a.@out(0xF4, al);
        a.cli();
        a.hlt();
    }

    /// <summary>Polls <paramref name="condition"/> on the vmspace's counters until it holds (a
    /// state the system must reach, not a time it must reach it in).</summary>
    private static async Task<VmspaceProtocol.PagingStats> Until(GuestRun run, Func<VmspaceProtocol.PagingStats, bool> condition, string what)
    {
        var deadline = DateTime.UtcNow.AddMinutes(2);
        while (true)
        {
            var s = await Paging(run);
            if (condition(s)) return s;
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"never reached: {what}; last: {s}");
            await Task.Delay(20);
        }
    }

    private static async Task<VmspaceProtocol.PmapEntries> Pmap(GuestRun run, ulong gpa, ulong length)
    {
        var vmspace = await run.ResolveChild("vmspace");
        return await vmspace.Ask<VmspaceProtocol.PmapEntries>(new VmspaceProtocol.GetPmap(1, gpa, length), Ask);
    }

    private static string SwapFile() => Path.Combine(Path.GetTempPath(), $"actorvmm-test-{Guid.NewGuid():N}.swap");

    /// <summary>Reads 64 fresh pages from 4 MiB on (ORing what it reads), stores the OR at 2 MiB
    /// and halts; <paramref name="touch"/> false: the same guest without the reads.</summary>
    private static LongModeImage FreshPageReader(bool touch, ulong first, int pages)
    {
        var a = new Assembler(64);
        var loop = a.CreateLabel();
        var done = a.CreateLabel();
        a.xor(ebx, ebx);
        if (!touch) a.jmp(done);
        a.mov(rsi, first);
        a.mov(ecx, pages);
        a.Label(ref loop);
        a.or(rbx, __qword_ptr[rsi]);   // read: must be zero
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(loop);
        a.Label(ref done);
        a.mov(rdi, 0x20_0000UL);
        a.mov(__qword_ptr[rdi], rbx);  // the guest's only other fresh page
        a.cli();
        a.hlt();
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    [KvmFact]
    public async Task A_guest_touching_fresh_pages_takes_one_missing_fault_per_page_and_reads_zero()
    {
        const ulong first = 0x40_0000; // 4 MiB: above everything the loader wrote
        const int pages = 64;
        // The same guest without the reads: its own faults (the result page; the loader's pages,
        // its code and page tables, are resident already and take MINOR faults, not MISSING).
        VmspaceProtocol.PagingStats baseline;
        await using (var idle = await GuestRun.RunAsync(FreshPageReader(false, first, pages), 16 << 20, 1, null, VmspaceOptions.Paged()))
        {
            Assert.Equal(VmProtocol.OutcomeKind.Halted, idle.Outcome.Kind);
            baseline = await Paging(idle);
        }

        await using var run = await GuestRun.RunAsync(FreshPageReader(true, first, pages), 16 << 20, 1, null, VmspaceOptions.Paged());
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(0UL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(0x20_0000)));
        var paging = await Paging(run);
        Assert.Equal((1L, 1L), (baseline.MissingFaults, baseline.ZeroFills)); // the result page
        Assert.Equal((baseline.MissingFaults + pages, baseline.ZeroFills + pages, baseline.MinorFaults),
            (paging.MissingFaults, paging.ZeroFills, paging.MinorFaults));
        // Exactly those pages: each filled by a read (resident, accessed, write-protected: not
        // dirty), and the page after them never touched.
        var pm = await Pmap(run, first, (pages + 1) * Page);
        var b = pm.Bits();
        for (var i = 0; i < pages; i++)
            Assert.Equal((true, true, false), ((pm.Entries[i] & b.Valid) != 0, (pm.Entries[i] & b.Accessed) != 0, (pm.Entries[i] & b.Modified) != 0));
        Assert.Equal(0UL, pm.Entries[pages] & b.Valid);
    }

    [KvmFact]
    public async Task A_guest_writes_32_mib_with_8_mib_resident_and_reads_it_back_identical()
    {
        const ulong start = 0x40_0000;
        const int pages = 32 * 256;
        var a = new Assembler(64);
        var write = a.CreateLabel();
        var check = a.CreateLabel();
        var bad = a.CreateLabel();
        a.mov(rsi, start);
        a.mov(ecx, pages);
        a.Label(ref write);
        a.mov(__qword_ptr[rsi], rsi);   // each page holds its own address
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(write);
        a.mov(rsi, start);
        a.mov(ecx, pages);
        a.Label(ref check);
        a.cmp(__qword_ptr[rsi], rsi);
        a.jne(bad);
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(check);
        a.mov(al, 0);
        a.@out(0xF4, al);               // status 1: all identical
        a.Label(ref bad);
        a.mov(al, 1);
        a.@out(0xF4, al);               // status 3: a page came back wrong
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
        var swap = Path.Combine(Path.GetTempPath(), $"actorvmm-test-{Guid.NewGuid():N}.swap");

        await using var run = await GuestRun.RunAsync(image, 48 << 20, 1, TimeSpan.FromSeconds(600),
            VmspaceOptions.Paged(swap, residentLimitBytes: 8 << 20));
        Assert.True(run.Outcome.ExitCode == 1, run.Outcome.ToString());
        var paging = await Paging(run);
        Assert.True(paging.SwapOuts > 0, "nothing was swapped out");
        Assert.True(paging.SwapIns > 0, "nothing was swapped back in");
    }

    [KvmFact]
    public async Task A_256_mib_guest_runs_in_64_mib_resident_and_the_swapper_pages_out_what_it_left_idle()
    {
        const ulong ram = 256 << 20, limit = 64 << 20;
        const ulong start = 0x40_0000;
        const int pages = 96 * 256;                   // 96 MiB: half again the limit
        var a = new Assembler(64);
        var write = a.CreateLabel();
        var check = a.CreateLabel();
        var bad = a.CreateLabel();
        a.mov(rsi, start);
        a.mov(ecx, pages);
        a.Label(ref write);
        a.mov(__qword_ptr[rsi], rsi);                 // one qword per page: its own address
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(write);
        HostGate.SignalAndWait(a, 1);                          // idle while the host watches the swapper
        a.mov(rsi, start);
        a.mov(ecx, pages);
        a.Label(ref check);
        a.cmp(__qword_ptr[rsi], rsi);
        a.jne(bad);
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(check);
        Exit(a, 0);                                   // exit code 1: every page came back
        a.Label(ref bad);
        Exit(a, 1);                                   // exit code 3: a page came back wrong
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
        var gate = new HostGate();
        var swap = SwapFile();

        await using var run = await GuestRun.StartAsync(image, ram, 1,
            VmspaceOptions.Paged(swap, limit, coldScans: 2, scanInterval: TimeSpan.FromMilliseconds(100)), LapicMode.Emulated, devices: gate.Device());
        await gate.ReachedAsync(1, run, TimeSpan.FromMinutes(5));
        var written = await Paging(run);
        Assert.True(written.PeakResidentPages <= limit / Page, $"peak {written.PeakResidentPages} pages resident");
        Assert.True(written.SwapOuts >= (long)(pages - limit / Page), $"only {written.SwapOuts} swap-outs");
        // The guest now spins on the gate: all it touches is its code page. The swapper must take
        // the rest (every page idle for two scans).
        var idle = await Until(run, s => s.ScanPageOuts > 0 && s.ResidentPages <= 16, "the swapper swapped out the idle pages");
        Assert.True(idle.AccessedScans >= 3, $"{idle.AccessedScans} scans");
        gate.Release(1);

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(10));
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
        var end = await Paging(run);
        Assert.True(end.PeakResidentPages <= limit / Page, $"peak {end.PeakResidentPages} pages resident");
        Assert.True(end.SwapIns >= pages - 16, $"only {end.SwapIns} swap-ins");
        var vmspace = await run.ResolveChild("vmspace");
        var stats = await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Ask);
        Assert.True(stats.ResidentBytes <= limit, $"{stats.ResidentBytes} bytes allocated by the host");
        Assert.Equal(256UL << 20, stats.GuestBytes);
    }

    [KvmFact]
    public async Task A_guest_reading_page_A_and_writing_page_B_leaves_A_accessed_and_B_accessed_and_dirty_again_after_a_clear()
    {
        const ulong pageA = 0x40_0000, pageB = 0x40_1000;
        var a = new Assembler(64);
        for (uint round = 1; round <= 2; round++)
        {
            a.mov(rdi, pageA);
            a.mov(rax, __qword_ptr[rdi]);              // read A
            a.mov(rdi, pageB);
            a.mov(__qword_ptr[rdi], (int)round);       // write B
            HostGate.SignalAndWait(a, round);
        }
        Exit(a, 0);
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
        var gate = new HostGate();

        await using var run = await GuestRun.StartAsync(image, 16 << 20, 1, VmspaceOptions.Paged(), LapicMode.Emulated, devices: gate.Device());
        var vmspace = await run.ResolveChild("vmspace");
        async Task<PageAD[]> Scan() =>
            (await vmspace.Ask<VmspaceProtocol.AccessedDirty>(new VmspaceProtocol.ScanAccessedDirty(1, pageA, 2 * Page), Ask)).Pages;
        PageAD[] expected = [PageAD.Accessed, PageAD.Accessed | PageAD.Dirty];

        await gate.ReachedAsync(1, run);
        Assert.Equal(expected, await Scan());
        var first = await Paging(run);
        Assert.Equal(2L, first.MissingFaults - first.Retries); // both pages were fresh

        // Clearing goes through the EPT barrier: the vcpu spinning on the gate is kicked and acks.
        await vmspace.Ask<VmspaceProtocol.AccessedCleared>(new VmspaceProtocol.ClearAccessed(2, pageA, 2 * Page), Ask);
        await vmspace.Ask<VmspaceProtocol.DirtyCleared>(new VmspaceProtocol.ClearDirty(3, pageA, 2 * Page), Ask);
        Assert.Equal([PageAD.None, PageAD.None], await Scan());
        gate.Release(1);

        await gate.ReachedAsync(2, run);
        Assert.Equal(expected, await Scan());
        var second = await Paging(run);
        // In the guest view both pages were zapped: each touch was a MINOR fault (the write one
        // too: a write to a zapped page is reported MINOR|WRITE), none was MISSING again.
        Assert.Equal((first.MissingFaults, first.MinorFaults + 2), (second.MissingFaults, second.MinorFaults));
        Assert.True(second.EptGeneration >= first.EptGeneration + 2, $"generation {first.EptGeneration} -> {second.EptGeneration}");
        Assert.Equal(2UL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(pageB)));
        gate.Release(2);

        var outcome = await run.WaitAsync();
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
    }

    [KvmFact]
    public async Task A_guest_touching_a_gpa_in_no_segment_with_paging_on_reads_all_ones_and_runs_on()
    {
        var a = new Assembler(64);
        a.mov(rsi, 0x4000_0000UL);                       // 1 GiB: above this 16 MiB guest's RAM
        a.mov(rax, __qword_ptr[rsi]);                    // unassigned: all ones
        a.mov(__qword_ptr[rsi], rax);                    // dropped
        a.mov(rbx, __qword_ptr[rsi]);
        a.mov(rsi, 0xD000_0000UL);                       // the MMIO hole below 4 GiB: nothing there either
        a.mov(ecx, __dword_ptr[rsi]);
        a.mov(rdi, 0x20_0000UL);
        a.mov(__qword_ptr[rdi], rax);
        a.mov(__qword_ptr[rdi + 8], rbx);
        a.mov(__qword_ptr[rdi + 16], rcx);
        Exit(a, 0);
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);

        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, VmspaceOptions.Paged());
        Assert.True(run.Outcome.ExitCode == 1, run.Outcome.ToString()); // it went on to the exit
        Assert.Equal(ulong.MaxValue, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(0x20_0000)));
        Assert.Equal(ulong.MaxValue, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(0x20_0008)));
        Assert.Equal(0xFFFF_FFFFUL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(0x20_0010))); // a dword read, zero-extended
        var paging = await Paging(run);
        Assert.True(paging.Enabled, paging.Failure); // the vmspace saw nothing wrong: no fault outside RAM
        Assert.Null(paging.Failure);
    }

    [KvmFact]
    public async Task A_held_page_stays_resident_while_a_guest_presses_the_resident_limit_and_goes_once_released()
    {
        const ulong held = 0x40_0000, others = 0x80_0000;
        const int pages = 2048;                           // 8 MiB through a 2 MiB limit
        const ulong limit = 2 << 20;
        var a = new Assembler(64);
        var press = a.CreateLabel();
        var bad = a.CreateLabel();
        a.mov(rdi, held);
        a.mov(rax, 0x1234_5678_9ABC_DEF0UL);
        a.mov(__qword_ptr[rdi], rax);
        HostGate.SignalAndWait(a, 1);                              // the host holds the page
        a.mov(rsi, others);
        a.mov(ecx, pages);
        a.Label(ref press);
        a.mov(__qword_ptr[rsi], rsi);
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(press);
        HostGate.SignalAndWait(a, 2);                              // the host checks, releases, lets it go
        a.mov(rdi, held);
        a.mov(rax, 0x1234_5678_9ABC_DEF0UL);
        a.cmp(__qword_ptr[rdi], rax);                     // back from swap, intact
        a.jne(bad);
        Exit(a, 0);
        a.Label(ref bad);
        Exit(a, 1);
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
        var gate = new HostGate();

        await using var run = await GuestRun.StartAsync(image, 16 << 20, 1,
            VmspaceOptions.Paged(SwapFile(), limit, coldScans: 2, scanInterval: TimeSpan.FromMilliseconds(50)), LapicMode.Emulated, devices: gate.Device());
        var vmspace = await run.ResolveChild("vmspace");
        await gate.ReachedAsync(1, run);
        // The holder must outlive the hold (the vmspace releases the holds of a holder that stops,
        // as an Ask's temporary actor does at once): an inbox, standing in for a device.
        using var holder = Inbox.Create(run.System);
        holder.Send(vmspace, new VmspaceProtocol.Hold(1, held, Page));
        var lease = Assert.IsType<VmspaceProtocol.HoldGranted>(await holder.ReceiveAsync(Ask)).Hold;
        gate.Release(1);

        await gate.ReachedAsync(2, run);
        var pressed = await Paging(run);
        Assert.True(pressed.SwapOuts >= pages - (long)(limit / Page), $"only {pressed.SwapOuts} swap-outs: no pressure");
        // The guest idles on the gate: let the swapper scan past its cold count too.
        await Until(run, s => s.AccessedScans >= pressed.AccessedScans + 3, "three more swapper scans");
        var pm = await Pmap(run, held, Page);
        var b = pm.Bits();
        Assert.Equal((true, true, false), ((pm.Entries[0] & b.Held) != 0, (pm.Entries[0] & b.Valid) != 0, (pm.Entries[0] & b.Swapped) != 0));

        holder.Send(vmspace, new VmspaceProtocol.Release(lease.HoldId));
        Assert.IsType<VmspaceProtocol.HoldReleased>(await holder.ReceiveAsync(Ask));
        await AwaitSwapped(run, held);
        var swapInsBefore = (await Paging(run)).SwapIns;
        gate.Release(2);

        var outcome = await run.WaitAsync(TimeSpan.FromMinutes(5));
        Assert.True(outcome.ExitCode == 1, outcome.ToString());
        Assert.True((await Paging(run)).SwapIns > swapInsBefore, "the released page did not come back from swap");
    }

    /// <summary>Waits until the page of <paramref name="gpa"/> is in the swap file (the swapper takes an idle page).</summary>
    private static async Task AwaitSwapped(GuestRun run, ulong gpa)
    {
        var deadline = DateTime.UtcNow.AddMinutes(2);
        while (true)
        {
            var pm = await Pmap(run, gpa, Page);
            if ((pm.Entries[0] & pm.Bits().Swapped) != 0) return;
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"gpa 0x{gpa:X} was never swapped out: entry 0x{pm.Entries[0]:X}");
            await Task.Delay(20);
        }
    }
}
