using ActorVmm.Devices.Pci;

namespace ActorVmm.Devices.Tests.Pci;

/// <summary>INTx swizzle onto GSIs 16-19, shared active-low wires (PCI Local Bus 3.0 §2.2.6).</summary>
public sealed class PciInterruptRoutingTests
{
    [Theory]
    [InlineData(0, PciInterruptPin.IntA, 16u)]
    [InlineData(0, PciInterruptPin.IntD, 19u)]
    [InlineData(1, PciInterruptPin.IntA, 17u)]
    [InlineData(1, PciInterruptPin.IntD, 16u)]
    [InlineData(3, PciInterruptPin.IntB, 16u)]
    [InlineData(31, PciInterruptPin.IntA, 19u)]
    public void Swizzle_is_device_plus_pin_mod_4(int device, PciInterruptPin pin, uint gsi) =>
        Assert.Equal(gsi, PciInterruptRouting.Gsi(device, pin));

    [Fact]
    public void No_pin_has_no_gsi() => Assert.Null(PciInterruptRouting.Gsi(2, PciInterruptPin.None));

    [Fact]
    public void Wires_idle_high_and_a_shared_wire_stays_low_until_every_holder_releases_it()
    {
        var pins = Enumerable.Range(0, 4).Select(_ => new RecordingInterruptLine()).ToArray();
        var routing = new PciInterruptRouting(gsi => pins[gsi - PciInterruptRouting.FirstGsi]);
        Assert.All(pins, p => Assert.True(p.Level)); // pulled up

        var a = routing.Line(1, PciInterruptPin.IntA); // GSI 17
        var b = routing.Line(0, PciInterruptPin.IntB); // GSI 17 too
        a.Assert();
        Assert.False(pins[1].Level);
        Assert.True(routing.IsAsserted(17));
        b.Assert();
        a.Deassert();
        Assert.False(pins[1].Level); // b still holds it
        b.Deassert();
        Assert.True(pins[1].Level);
        Assert.False(routing.IsAsserted(17));
        Assert.True(pins[0].Level && pins[2].Level && pins[3].Level);
    }

    [Fact]
    public void A_function_drives_its_routed_wire_through_its_config_space()
    {
        var pins = Enumerable.Range(0, 4).Select(_ => new RecordingInterruptLine()).ToArray();
        var routing = new PciInterruptRouting(gsi => pins[gsi - PciInterruptRouting.FirstGsi]);
        var bus = new PciBus();
        var function = bus.Attach(2, 0, new PciConfigSpace(new PciIds(1, 2, 3, 4), PciInterruptPin.IntA));
        function.ConnectIntx(routing.Line(2, function.Pin));

        function.SetIntx(true);

        Assert.Equal(18u, function.InterruptLine);
        Assert.False(pins[2].Level);
        function.SetIntx(false);
        Assert.True(pins[2].Level);
    }
}
