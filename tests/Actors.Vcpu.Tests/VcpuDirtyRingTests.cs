using Akka.Actor;
using Akka.TestKit;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using Xunit.Abstractions;
using static ActorVmm.Vcpu.VcpuProtocol;

namespace ActorVmm.Vcpu.Tests;

/// <summary>
/// A vcpu with a dirty ring: it harvests on its own (pinned) thread, as its part of the EPT barrier
/// and after a ring-full exit, and sends the GFNs to the vmspace as plain data.
/// </summary>
public sealed class VcpuDirtyRingTests : TestKit
{
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(5);
    private readonly List<(IActorRef Actor, ScriptedVcpu Fake)> _started = [];

    public VcpuDirtyRingTests(ITestOutputHelper output) : base(VcpuProtocol.DefaultConfig, output)
    {
    }

    private (ScriptedVcpu Fake, IActorRef Vcpu, TestProbe Vmspace) Start()
    {
        var fake = new ScriptedVcpu();
        var vmspace = CreateTestProbe("vmspace");
        var wiring = new Wiring(AddressBus<DeviceRoute>.Empty, AddressBus<DeviceRoute>.Empty, CreateTestProbe("vm").Ref, null,
            Vmspace: vmspace.Ref);
        var actor = Sys.ActorOf(VcpuProtocol.Props(fake, wiring), "vcpu-0"); // pinned: a thread of its own, named vcpu-0
        _started.Add((actor, fake));
        actor.Tell(VcpuProtocol.Start.Instance);
        Assert.True(fake.WaitUntilIdleInGuest(), "the vcpu did not enter the guest after Start");
        return (fake, actor, vmspace);
    }

    protected override void Dispose(bool disposing)
    {
        foreach (var (actor, fake) in _started)
        {
            actor.Tell(Stop.Instance, ActorRefs.NoSender);
            fake.Dispose();
        }
        base.Dispose(disposing);
    }

    [Fact]
    public async Task Vcpu_must_leave_the_guest_harvest_its_ring_on_its_thread_and_ack_with_the_gfns()
    {
        var (fake, vcpu, vmspace) = Start();
        fake.SupplyHarvest(0x20, 0x21);
        var kicks = fake.Kicks;

        vcpu.Tell(new VmspaceProtocol.InvalidateEpt(3), vmspace.Ref);

        var ack = await vmspace.ExpectMsgAsync<VmspaceProtocol.EptInvalidated>(Wait);
        Assert.Equal((0, 3UL), (ack.VcpuId, ack.Generation));
        Assert.Equal([0x20UL, 0x21UL], ack.DirtyGfns!);
        Assert.True(fake.Kicks > kicks, "the vcpu was not kicked out of the guest for the barrier");
        Assert.Equal("vcpu-0", fake.HarvestThreadName);
        Assert.True(fake.WaitUntilIdleInGuest(), "the vcpu did not go back into the guest");

        vcpu.Tell(new VmspaceProtocol.InvalidateEpt(4), vmspace.Ref); // nothing written since
        var empty = await vmspace.ExpectMsgAsync<VmspaceProtocol.EptInvalidated>(Wait);
        Assert.Equal((4UL, (ulong[]?)null, false), (empty.Generation, empty.DirtyGfns, empty.RingOverflowed));

        fake.SupplyHarvest(new DirtyRingHarvest([0x22], RingWasFull: true)); // KVM may have lost writes: say so
        vcpu.Tell(new VmspaceProtocol.InvalidateEpt(5), vmspace.Ref);
        var full = await vmspace.ExpectMsgAsync<VmspaceProtocol.EptInvalidated>(Wait);
        Assert.Equal((5UL, true), (full.Generation, full.RingOverflowed));
    }

    [Fact]
    public async Task Vcpu_must_harvest_a_full_ring_send_it_to_the_vmspace_and_run_on()
    {
        var (fake, vcpu, vmspace) = Start();
        fake.SupplyHarvest(0x30, 0x31, 0x32);
        var runs = fake.Runs;

        fake.Supply(VmExit.DirtyRingFull.Instance);

        var harvested = await vmspace.ExpectMsgAsync<VmspaceProtocol.DirtyRingHarvested>(Wait);
        Assert.Equal(0, harvested.VcpuId);
        Assert.Equal([0x30UL, 0x31UL, 0x32UL], harvested.Gfns);
        Assert.Equal("vcpu-0", fake.HarvestThreadName);
        Assert.True(fake.WaitUntil(v => v.Runs > runs && v.InRun), "the vcpu did not run on after harvesting");

        vcpu.Tell(GetStats.Instance, TestActor);
        var stats = await ExpectMsgAsync<Stats>(Wait);
        Assert.Equal(1, stats.Reasons.Single(r => r.Reason == "dirty-ring-full").Count);
    }
}
