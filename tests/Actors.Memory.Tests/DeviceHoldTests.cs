using Akka.Actor;
using Akka.TestKit.Xunit2;
using ActorVmm.Devices;
using ActorVmm.Memory;
using static ActorVmm.Memory.VmspaceProtocol;

namespace ActorVmm.Actors.Memory.Tests;

/// <summary>
/// Page holds of device actors across a restart (issue 4 item 6), with a real vmspace (memfd +
/// userfaultfd) and the real device actor. A device holds pages by asking the vmspace as itself
/// (the lease belongs to the sender), so the tests send <see cref="Hold"/> with the device as
/// sender, exactly the message its own request would be.
/// </summary>
public sealed class DeviceHoldTests : TestKit
{
    private const ulong Page = 4096;
    private static readonly TimeSpan Wait = TimeSpan.FromSeconds(10);

    /// <summary>A model with one register; it never throws (crashes are injected).</summary>
    private sealed class Register : IBusDevice
    {
        private ulong _value;
        public ulong Read(ulong offset, int size) => _value;
        public void Write(ulong offset, int size, ulong value) => _value = value;
    }

    private async Task<(ulong Held, ulong Entry, PmapBits Bits)> HoldState(PagedVmspace vm, ulong gpa)
    {
        var held = (await vm.Stats()).Paging.HeldPages;
        var pm = await vm.Ask<PmapEntries>(new GetPmap(99, gpa, Page));
        return (held, pm.Entries[0], pm.Bits());
    }

    [Fact]
    public async Task A_restarting_device_releases_its_holds_and_keeps_running()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20);
        const ulong p = 0x40000;
        var device = Sys.ActorOf(DeviceProtocol.Props("dma0", _ => new Register(), null, ActorRefs.Nobody, vm.Vmspace), "dma0");
        vm.Vmspace.Tell(new Hold(1, p, 2 * Page), device);
        await AwaitAssertAsync(async () => Assert.Equal(2UL, (await HoldState(vm, p)).Held), Wait);
        var before = await HoldState(vm, p);
        Assert.NotEqual(0UL, before.Entry & before.Bits.Held);

        device.Tell(new FaultProtocol.Crash("test"));

        await AwaitAssertAsync(async () => Assert.Equal(0UL, (await HoldState(vm, p)).Held), Wait);
        var after = await HoldState(vm, p);
        Assert.Equal(0UL, after.Entry & after.Bits.Held);
        var health = await device.Ask<DeviceProtocol.Health>(DeviceProtocol.GetHealth.Instance, Wait);
        Assert.Equal(1, health.Restarts);
        // The page is free to go now: nothing pins it.
        Assert.Equal(1, (await vm.Ask<SwappedOut>(new SwapOut(2, p, Page))).Pages);
    }

    [Fact]
    public async Task A_restarting_device_releases_only_its_own_holds()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20);
        var device = Sys.ActorOf(DeviceProtocol.Props("dma1", _ => new Register(), null, ActorRefs.Nobody, vm.Vmspace), "dma1");
        var other = CreateTestProbe();
        vm.Vmspace.Tell(new Hold(1, 0x10000, Page), device);
        vm.Vmspace.Tell(new Hold(2, 0x20000, Page), other);
        await other.ExpectMsgAsync<HoldGranted>(Wait);
        await AwaitAssertAsync(async () => Assert.Equal(2UL, (await vm.Stats()).Paging.HeldPages), Wait);

        device.Tell(new FaultProtocol.Crash("test"));

        await AwaitAssertAsync(async () => Assert.Equal(1UL, (await vm.Stats()).Paging.HeldPages), Wait);
        var (held, entry, bits) = await HoldState(vm, 0x20000);
        Assert.Equal((1UL, true), (held, (entry & bits.Held) != 0));
    }

    [Fact]
    public async Task A_hold_asked_for_with_Ask_is_refused_clearly_and_pins_nothing()
    {
        await using var vm = await PagedVmspace.StartAsync(this, 1 << 20);
        const ulong p = 0x30000;
        await vm.Guest(() => GuestAccess.Write(vm.Gva(p), [5]));
        var answer = await vm.Vmspace.Ask<object>(new Hold(1, p, Page), Wait);

        var refused = Assert.IsType<Refused>(answer);
        Assert.Contains("not with Ask", refused.Reason);
        Assert.Equal(0UL, (await HoldState(vm, p)).Held);
        Assert.Equal(1, (await vm.Ask<SwappedOut>(new SwapOut(2, p, Page))).Pages); // nothing pins it
    }
}
