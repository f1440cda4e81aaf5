using Akka.Actor;
using Akka.TestKit.Xunit2;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>The EPT-generation barrier with TestProbes standing in for vcpus.</summary>
public sealed class EptBarrierTests : TestKit
{
    private const ulong OneMiB = 1 << 20;
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(5);
    private static readonly TimeSpan Quiet = TimeSpan.FromMilliseconds(200);

    [Fact]
    public async Task Sync_must_wait_for_both_vcpus()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var v0 = CreateTestProbe("vcpu0");
        var v1 = CreateTestProbe("vcpu1");
        vm.Vmspace.Tell(new RegisterVcpu(0, v0));
        vm.Vmspace.Tell(new RegisterVcpu(1, v1));

        vm.Vmspace.Tell(new SyncEpt(7), TestActor);
        var g0 = (await v0.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        var g1 = (await v1.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        Assert.Equal(g0, g1);
        vm.Vmspace.Tell(new EptInvalidated(0, g0));
        await ExpectNoMsgAsync(Quiet);
        vm.Vmspace.Tell(new EptInvalidated(1, g1));
        Assert.Equal(new EptSynced(7, g0), await ExpectMsgAsync<EptSynced>(Wait));
    }

    [Fact]
    public async Task Clear_dirty_completes_only_after_the_vcpus_acked()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var v0 = CreateTestProbe("vcpu0");
        vm.Vmspace.Tell(new RegisterVcpu(0, v0));
        await vm.Guest(() => GuestAccess.Write(vm.Gva(0x4000), [1]));

        vm.Vmspace.Tell(new ClearDirty(1, 0x4000, 4096), TestActor);
        var g = (await v0.ExpectMsgAsync<InvalidateEpt>(Wait)).Generation;
        await ExpectNoMsgAsync(Quiet);
        vm.Vmspace.Tell(new EptInvalidated(0, g));
        Assert.Equal(new DirtyCleared(1, g), await ExpectMsgAsync<DirtyCleared>(Wait));
    }

    [Fact]
    public async Task Unregistering_a_vcpu_that_never_acks_completes_the_barrier()
    {
        await using var vm = await PagedVmspace.StartAsync(this, OneMiB);
        var v0 = CreateTestProbe("vcpu0");
        vm.Vmspace.Tell(new RegisterVcpu(0, v0));
        vm.Vmspace.Tell(new SyncEpt(1), TestActor);
        await v0.ExpectMsgAsync<InvalidateEpt>(Wait);
        vm.Vmspace.Tell(new UnregisterVcpu(0));
        Assert.Equal(1, (await ExpectMsgAsync<EptSynced>(Wait)).Id);
    }

    [Fact]
    public void An_ack_of_a_later_generation_covers_earlier_ones()
    {
        var barrier = new EptBarrier();
        var v = CreateTestProbe();
        barrier.Register(0, v);
        var done = new List<ulong>();
        var g1 = barrier.Invalidate(TestActor);
        barrier.WhenComplete(g1, () => done.Add(g1));
        var g2 = barrier.Invalidate(TestActor);
        barrier.WhenComplete(g2, () => done.Add(g2));
        barrier.Ack(0, g2);
        Assert.Equal([g1, g2], done);
        Assert.Equal(0, barrier.Waiting);
    }
}
