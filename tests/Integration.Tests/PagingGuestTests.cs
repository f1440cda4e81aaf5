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
    private const ushort GatePort = 0x700;
    private const ulong Page = 4096;
    private static readonly TimeSpan Ask = TimeSpan.FromSeconds(10);

    private static async Task<VmspaceProtocol.PagingStats> Paging(GuestRun run)
    {
        var vmspace = await run.ResolveChild("vmspace");
        return (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, Ask)).Paging;
    }

    private static DeviceSpec Gate(HostGate gate) => new("gate", DeviceProtocol.Space.Port, GatePort, 4, _ => gate);

    /// <summary>Guest code: tell the host "step <paramref name="step"/> reached" (OUT) and spin on IN
    /// until the host released that step. Clobbers eax, edx.</summary>
    private static void SignalAndWait(Assembler a, uint step)
    {
        var wait = a.CreateLabel();
        a.mov(eax, step);
        a.mov(dx, GatePort);
        a.@out(dx, eax);
        a.Label(ref wait);
        a.@in(eax, dx);
        a.cmp(eax, step);
        a.jb(wait);
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

    [KvmFact]
    public async Task A_guest_touching_fresh_pages_takes_one_missing_fault_per_page_and_reads_zero()
    {
        const ulong first = 0x40_0000; // 4 MiB: above everything the loader wrote
        const int pages = 64;
        var a = new Assembler(64);
        var loop = a.CreateLabel();
        a.mov(rsi, first);
        a.mov(ecx, pages);
        a.xor(ebx, ebx);
        a.Label(ref loop);
        a.or(rbx, __qword_ptr[rsi]);   // read: must be zero
        a.add(rsi, 4096);
        a.dec(ecx);
        a.jnz(loop);
        a.mov(rdi, 0x20_0000UL);
        a.mov(__qword_ptr[rdi], rbx);
        a.cli();
        a.hlt();
        var image = new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);

        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, VmspaceOptions.Paged());
        Assert.Equal(VmProtocol.OutcomeKind.Halted, run.Outcome.Kind);
        Assert.Equal(0UL, run.Vm.Memory.ReadUInt64(new GuestPhysAddr(0x20_0000)));
        var paging = await Paging(run);
        Assert.True(paging.MissingFaults >= pages, $"{paging.MissingFaults} missing faults for {pages} fresh pages");
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
        SignalAndWait(a, 1);                          // idle while the host watches the swapper
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
            VmspaceOptions.Paged(swap, limit, coldScans: 2, scanInterval: TimeSpan.FromMilliseconds(100)), LapicMode.Emulated, Gate(gate));
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
}
