using Akka.Actor;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.Memory;
using ActorVmm.Testing;
using ActorVmm.Vcpu;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// The EPT invalidation barrier (the seed's pmap_invalidate_ept) with two real vcpus spinning in
/// the guest: a change is complete only once both were kicked and acked; a stalled vcpu holds it
/// up until it acks; a paused vcpu acks at once.
/// </summary>
public sealed class EptBarrierGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Trampoline = 0x9000; // SIPI vector 0x09
    private const ushort ApReady = 0x8F08;

    /// <summary>vcpu 0 starts vcpu 1 (INIT-SIPI), waits for it to run, prints 'S' and spins; vcpu 1 spins too.</summary>
    private static LongModeImage TwoSpinners()
    {
        var ap = new Assembler(16);
        var apSpin = ap.CreateLabel();
        ap.xor(ax, ax);
        ap.mov(ds, ax);
        ap.mov(__byte_ptr[ApReady], 1);
        ap.Label(ref apSpin);
        ap.jmp(apSpin);
        var apCode = GuestCode.Assemble(ap, Trampoline);

        var a = new Assembler(64);
        var trampoline = a.CreateLabel();
        var wait = a.CreateLabel();
        var spin = a.CreateLabel();
        a.lea(rsi, __[trampoline]);
        a.mov(rdi, (long)Trampoline);
        a.mov(ecx, apCode.Length);
        a.rep.movsb();
        InterruptCode.EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 1 << 24);
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4500);                            // INIT to APIC 1
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x4600 | (uint)(Trampoline >> 12)); // SIPI
        a.Label(ref wait);
        a.pause();
        a.cmp(__byte_ptr[ApReady], 1);
        a.jne(wait);
        a.mov(dx, 0x3F8);
        a.mov(al, (byte)'S');
        a.@out(dx, al);
        a.Label(ref spin);
        a.jmp(spin);
        a.Label(ref trampoline);
        a.db(apCode);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    private static async Task<VmspaceProtocol.EptSynced> SyncAsync(IActorRef vmspace, long id) =>
        await vmspace.Ask<VmspaceProtocol.EptSynced>(new VmspaceProtocol.SyncEpt(id), TimeSpan.FromSeconds(60));

    /// <summary>The acks for <paramref name="generation"/> in the trace, by vcpu.</summary>
    private static Dictionary<int, TraceEvent> Acks(GuestRun run, ulong generation) =>
        run.Trace.Snapshot().Where(e => e.Message is VmspaceProtocol.EptInvalidated i && i.Generation >= generation)
            .GroupBy(e => ((VmspaceProtocol.EptInvalidated)e.Message).VcpuId).ToDictionary(g => g.Key, g => g.First());

    [KvmFact]
    public async Task A_change_completes_only_after_both_spinning_vcpus_acked_and_a_stalled_one_holds_it_up()
    {
        await using var run = await GuestRun.StartAsync(TwoSpinners(), 16 << 20, 2, VmspaceOptions.Paged());
        Assert.True(await run.WaitForSerialAsync(1), "vcpu 1 did not come up");
        var vmspace = await run.ResolveChild("vmspace");

        // Both vcpus spin in the guest: each is kicked out and acks before the change is done (the
        // trace, read the moment the completion arrives, already holds both acks).
        var synced = await SyncAsync(vmspace, 1);
        var acks = Acks(run, synced.Generation);
        Assert.Equal([0, 1], acks.Keys.Order());

        // vcpu 1's thread stops for a while: the next change waits for its ack, which comes after the stall.
        // The change starts once vcpu 1 is inside its stall (resolving it while the change ran let
        // the invalidation reach vcpu 1 before the stall did, on a slow host, and it acked first).
        var (_, stall) = await run.StallStartedAsync("vcpu-1", TimeSpan.FromMilliseconds(500));
        var second = await SyncAsync(vmspace, 2);
        var stalled = await stall;
        Assert.Contains("vcpu 1 stalled", stalled);
        var acks2 = Acks(run, second.Generation);
        Assert.Equal([0, 1], acks2.Keys.Order());
        Assert.True(acks2[0].Id < acks2[1].Id, "the stalled vcpu acked before the running one");

        Assert.Equal("S", run.Serial);
        Assert.False(run.Vm.Ended.IsCompleted, "the guest stopped");
    }

    [KvmFact]
    public async Task A_paused_vcpu_acks_at_once_and_the_change_does_not_wait_for_it_to_run()
    {
        await using var run = await GuestRun.StartAsync(TwoSpinners(), 16 << 20, 2, VmspaceOptions.Paged());
        Assert.True(await run.WaitForSerialAsync(1), "vcpu 1 did not come up");
        var vmspace = await run.ResolveChild("vmspace");
        var vcpu1 = await run.ResolveChild("vcpu-1");
        await vcpu1.Ask<VcpuProtocol.Paused>(VcpuProtocol.Pause.Instance, TimeSpan.FromSeconds(30));

        var synced = await SyncAsync(vmspace, 3);

        var acks = Acks(run, synced.Generation);
        Assert.Equal([0, 1], acks.Keys.Order());
        var state = await vcpu1.Ask<VcpuProtocol.Stats>(VcpuProtocol.GetStats.Instance, TimeSpan.FromSeconds(30));
        Assert.Equal(VcpuProtocol.State.Paused, state.State); // it acked without entering the guest
        await vcpu1.Ask<VcpuProtocol.Resumed>(VcpuProtocol.Resume.Instance, TimeSpan.FromSeconds(30));
    }
}
