using Akka.Actor;
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

    private static async Task<VmspaceProtocol.PagingStats> Paging(GuestRun run)
    {
        var vmspace = await run.ResolveChild("vmspace");
        return (await vmspace.Ask<VmspaceProtocol.Stats>(VmspaceProtocol.GetStats.Instance, TimeSpan.FromSeconds(5))).Paging;
    }

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
}
