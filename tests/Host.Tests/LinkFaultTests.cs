using System.Diagnostics;
using Akka.Actor;
using Akka.Configuration;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using ActorVmm.Vcpu.Tests;
using Xunit;
using Xunit.Abstractions;

namespace ActorVmm.Host.Tests;

/// <summary>Link faults injected into a running VM (real VM, device and vcpu actors; scripted vcpu).</summary>
public sealed class LinkFaultTests : ScriptedVmTestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    public LinkFaultTests(ITestOutputHelper output) : base(output)
    {
    }


    private (IActorRef Vm, ScriptedVcpu Vcpu, SerialConsole Console, Task<VmProtocol.Outcome> Ended) Start(LinkFaultPlan plan)
    {
        var rig = Vms.Start(faults: plan);
        return (rig.Vm, rig.Vcpus[0], rig.Console, rig.Ended);
    }

    private static VmExit.Io Out(ushort port, char c) => new(true, port, 1, 1, c, null);

    [Fact]
    public void A_delayed_link_delivers_everything_late_and_in_order()
    {
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault("vcpu-0", "uart0", "Write", LinkFaultKind.Delay, TimeSpan.FromMilliseconds(300)));
        var (_, vcpu, console, _) = Start(plan);
        var clock = Stopwatch.StartNew();
        vcpu.Supply(Out(0x3F8, 'a'), Out(0x3F8, 'b'), Out(0x3F8, 'c'));
        Assert.True(vcpu.WaitUntilIdleInGuest());
        Assert.Equal("", console.CapturedText()); // posted writes: the vcpu ran on, the link holds them
        Assert.True(vcpu.WaitUntil(_ => console.CapturedText() == "abc", Wait), console.CapturedText());
        Assert.True(clock.ElapsedMilliseconds >= 250, $"arrived after {clock.ElapsedMilliseconds} ms");
        Assert.Equal(3, plan.Delayed);
    }

    [Fact]
    public async Task A_dropped_message_is_lost_and_counted_and_a_duplicated_one_arrives_twice()
    {
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault("vcpu-0", "post-code", "*", LinkFaultKind.Drop));
        plan.Add(new LinkFault("vcpu-0", "uart0", "Write", LinkFaultKind.Duplicate));
        var postCodes = new System.Collections.Concurrent.ConcurrentQueue<ulong>();
        var rig = Vms.Start(faults: plan, extra: [new DeviceSpec("post-code", DeviceProtocol.Space.Port, 0x80, 1, _ => new Recorder(postCodes))]);
        var (vcpu, console) = (rig.Vcpus[0], rig.Console);
        vcpu.Supply(Out(0x80, '\u0001'), Out(0x3F8, 'x'), Out(0x80, '\u0002'));
        Assert.True(vcpu.WaitUntil(_ => console.CapturedText() == "xx", Wait), console.CapturedText());
        Assert.True(vcpu.WaitUntilIdleInGuest());
        await Task.Delay(200);
        Assert.Equal(2, plan.Dropped);
        Assert.Equal(1, plan.Duplicated);
        Assert.Empty(postCodes);
        Assert.False(rig.Ended.IsCompleted);
    }

    [Fact]
    public async Task A_delayed_request_to_a_vcpu_kicks_it_when_it_arrives()
    {
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault("*", "vcpu-0", "GetStats", LinkFaultKind.Delay, TimeSpan.FromMilliseconds(300)));
        var (vm, vcpu, _, _) = Start(plan);
        var actor = await Sys.ActorSelection(vm.Path / "vcpu-0").ResolveOne(Wait);
        var kicks = vcpu.Kicks;
        var clock = Stopwatch.StartNew();
        actor.Tell(VcpuProtocol.GetStats.Instance);
        var stats = await ExpectMsgAsync<VcpuProtocol.Stats>(Wait);
        Assert.Equal(VcpuProtocol.State.Running, stats.State);
        Assert.True(clock.ElapsedMilliseconds >= 250, $"answered after {clock.ElapsedMilliseconds} ms");
        Assert.True(vcpu.Kicks > kicks);
    }

    [Fact]
    public void A_delayed_vlapic_to_vcpu_link_still_delivers_every_interrupt_once()
    {
        const ulong lapic = 0xFEE0_0000;
        var plan = new LinkFaultPlan();
        plan.Add(new LinkFault("vlapic-0", "vcpu-0", "*", LinkFaultKind.Delay, TimeSpan.FromMilliseconds(150)));
        var rig = Vms.Start(interruptPlatform: true, faults: plan, lapic: LapicBackends.Emulated(null));
        var vcpu = rig.Vcpus[0];
        static VmExit.Mmio Write(ulong address, uint value) => new(address, true, 4, value);

        // Three self-IPIs at once; each handler ends with an EOI, which lets the next (lower) one in.
        vcpu.Supply(Write(lapic + 0xF0, 0x1FF), Write(lapic + 0x300, 0x0004_0050), Write(lapic + 0x300, 0x0004_0060),
            Write(lapic + 0x300, 0x0004_0070));
        foreach (var vector in new byte[] { 0x70, 0x60, 0x50 })
        {
            Assert.True(vcpu.WaitUntil(v => v.Injected.Contains(vector), Wait), $"vector 0x{vector:X2} never arrived");
            vcpu.Supply(Write(lapic + 0xB0, 0)); // EOI
        }
        Assert.True(vcpu.WaitUntilIdleInGuest());
        Thread.Sleep(400); // anything doubled would have come by now (two link delays)
        // Each exactly once. (The order may differ from an undelayed run: the vcpu acts on the
        // vlapic's state as it was when the delayed message left, and a higher vector that arrives
        // later nests over a lower one it already took, as on hardware.)
        Assert.Equal(new byte[] { 0x50, 0x60, 0x70 }, vcpu.Injected.Order());
        Assert.True(plan.Delayed >= 3, $"{plan.Delayed} messages delayed");
    }

    /// <summary>A device that records what is written to it.</summary>
    private sealed class Recorder(System.Collections.Concurrent.ConcurrentQueue<ulong> writes) : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;
        public void Write(ulong offset, int size, ulong value) => writes.Enqueue(value);
    }
}
