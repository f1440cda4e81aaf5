using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>The VM's wiring as a pure plan (no actor, no KVM), and the builder's one error filter.</summary>
public sealed class VmWiringTests
{
    private sealed class Nothing : IBusDevice
    {
        public ulong Read(ulong offset, int size) => 0;
        public void Write(ulong offset, int size, ulong value) { }
    }

    private static DeviceSpec Port(string name, ulong @base, ulong length) =>
        new(name, DeviceProtocol.Space.Port, @base, length, _ => new Nothing());

    private static DeviceSpec Mmio(string name, ulong @base, ulong length) =>
        new(name, DeviceProtocol.Space.Mmio, @base, length, _ => new Nothing());

    [Fact]
    public void Plan_creates_the_interrupt_controllers_first_and_puts_every_range_of_every_device_on_its_bus()
    {
        var uart = Port("uart0", 0x3F8, 8);
        var pic = Port(PcPlatform.PicName, 0x20, 2) with { MoreRanges = [new DeviceRange(DeviceProtocol.Space.Port, 0xA0, 2, 0x80)] };
        var ioapic = Mmio(PcPlatform.IoApicName, 0xFEC0_0000, 0x20);

        var wiring = VmWiring.Plan([uart, pic, ioapic]);

        Assert.Equal([pic.Name, ioapic.Name, uart.Name], wiring.Devices.Select(d => d.Name));
        Assert.Equal([(0x20UL, 2UL, "pic", 0UL), (0xA0UL, 2UL, "pic", 0x80UL), (0x3F8UL, 8UL, "uart0", 0UL)],
            wiring.Ports.Entries.Select(e => (e.Base, e.Length, e.Device.Device.Name, e.Device.Window)));
        Assert.Equal([(0xFEC0_0000UL, "ioapic")], wiring.Mmio.Entries.Select(e => (e.Base, e.Device.Device.Name)));
    }

    [Fact]
    public void A_pci_function_with_an_actor_of_its_own_gets_its_ecam_page_and_the_bridge_the_rest()
    {
        var rng = PcPlatform.VirtioRng();
        var pci = PcPlatform.PciHost([rng.PciFunction!]);

        var wiring = VmWiring.Plan([pci, rng]);

        var page = ActorVmm.Devices.Platform.PciEcamBase + 0x8000; // 00:01.0 (PCIe Base 4.0 §7.2.2)
        Assert.True(wiring.Mmio.TryResolve(page + 0x10, out var function, out var offset));
        Assert.Equal((PcPlatform.VirtioRngName, ActorVmm.Devices.Virtio.VirtioPciFunction.ConfigWindow + 0x10), (function.Device.Name, function.Window + offset));
        foreach (var (address, window) in new[] { (page - 4, 0x7FFCUL), (page + 0x1000, 0x9000UL), (ActorVmm.Devices.Platform.PciEcamBase, 0UL) })
        {
            Assert.True(wiring.Mmio.TryResolve(address, out var bridge, out var at));
            Assert.Equal((PcPlatform.PciName, window), (bridge.Device.Name, bridge.Window + at));
        }
        Assert.True(pci.WaitForWriteAt!(ActorVmm.Devices.Pci.PciHostBridge.ConfigDataWindow + 2)); // CONFIG_DATA writes are waited for
        Assert.False(pci.WaitForWriteAt(ActorVmm.Devices.Pci.PciHostBridge.ConfigAddressWindow));
        Assert.True(rng.WaitForWriteAt!(0x04));                                               // the function's configuration writes too
        Assert.False(rng.WaitForWriteAt(ActorVmm.Devices.Virtio.VirtioPciFunction.BarWindow)); // not its BAR's
    }

    [Fact]
    public void Plan_refuses_overlaps_naming_both_sides_and_a_port_range_past_0xFFFF()
    {
        var e = Assert.Throws<BusException>(() => VmWiring.Plan([Port("a", 0x60, 1), Port("b", 0x60, 4)]));
        Assert.Equal("b at 0x60-0x63 overlaps a at 0x60-0x60", e.Message);
        e = Assert.Throws<BusException>(() => VmWiring.Plan([Mmio("dev", 0x1000, 0x1000)], [("guest memory (ram)", 0, 0x10_0000)]));
        Assert.Equal("dev at 0x1000-0x1FFF overlaps guest memory (ram) at 0x0-0xFFFFF", e.Message);
        e = Assert.Throws<BusException>(() => VmWiring.Plan([Port("wide", 0xFFF0, 0x20)]));
        Assert.Equal("device wide extends past port 0xFFFF", e.Message);
    }

    [Fact]
    public void Each_vcpu_gets_its_own_routes_and_one_route_per_device_at_each_of_its_windows()
    {
        var pic = Port(PcPlatform.PicName, 0x20, 2) with { MoreRanges = [new DeviceRange(DeviceProtocol.Space.Port, 0xA0, 2, 0x80)], WaitForWrites = true };
        var wiring = VmWiring.Plan([pic]);
        var actor = ActorRefs.Nobody;

        var (ports0, mmio0) = wiring.RoutesFor(_ => actor);
        var (ports1, _) = wiring.RoutesFor(_ => actor);

        Assert.Equal(0, mmio0.Count);
        Assert.True(ports0.TryResolve(0xA1, out var slave, out var offset));
        Assert.Equal((pic.Name, 0x80UL, 1UL, true), (slave.Name, slave.Window, offset, slave.WaitForWrites));
        Assert.Same(actor, slave.Device);
        Assert.True(ports0.TryResolve(0x20, out var master, out _));
        Assert.Equal(0UL, master.Window);
        Assert.True(ports1.TryResolve(0x20, out var other, out _));
        Assert.NotSame(master, other); // per vcpu: its own write window to the device
    }

    [Fact]
    public void A_build_error_is_any_error_a_user_can_act_on_and_nothing_else()
    {
        Assert.True(VmBuildException.IsBuildError(new KvmException("KVM_CREATE_VM", 12)));
        Assert.True(VmBuildException.IsBuildError(new GuestMemoryException("layout")));
        Assert.True(VmBuildException.IsBuildError(new HostMemoryException("mlock")));
        Assert.True(VmBuildException.IsBuildError(new BusException("overlap")));
        Assert.True(VmBuildException.IsBuildError(new BootException("bad image")));
        Assert.True(VmBuildException.IsBuildError(new ArgumentException("memory size")));
        Assert.False(VmBuildException.IsBuildError(new InvalidOperationException("a bug")));
        Assert.False(VmBuildException.IsBuildError(new NullReferenceException()));
    }
}

/// <summary>The VM's supervision decision: by exception type first, then by what the child is rebuilt from.</summary>
public sealed class SupervisionTests
{
    private sealed class BrokenInvariant() : ActorVmm.Devices.InvariantViolationException("two records disagree");

    [Fact]
    public void An_invariant_violation_stops_even_a_child_that_could_restart()
    {
        Assert.Equal(Akka.Actor.Directive.Stop, ActorVmm.Host.Vm.VmActor.Supervision.Decide(restartable: true, new BrokenInvariant()));
        Assert.Equal(Akka.Actor.Directive.Stop,
            ActorVmm.Host.Vm.VmActor.Supervision.Decide(restartable: true, new ActorVmm.Memory.VmspaceException("pmap and kernel disagree")));
    }

    [Fact]
    public void Any_other_failure_restarts_a_child_rebuilt_from_its_state_record_and_stops_any_other()
    {
        var crash = new ActorVmm.Devices.InjectedFaultException("test");

        Assert.Equal(Akka.Actor.Directive.Restart, ActorVmm.Host.Vm.VmActor.Supervision.Decide(restartable: true, crash));
        Assert.Equal(Akka.Actor.Directive.Stop, ActorVmm.Host.Vm.VmActor.Supervision.Decide(restartable: false, crash));
        Assert.Equal(Akka.Actor.Directive.Restart, ActorVmm.Host.Vm.VmActor.Supervision.Decide(restartable: true, new IndexOutOfRangeException()));
    }
}
