namespace ActorVmm.Devices.Pci;

/// <summary>
/// INTx routing of bus 0 onto the IOAPIC. The four PCI interrupt wires (PIRQ A-D) go to IOAPIC
/// pins <see cref="FirstGsi"/>-<see cref="LastGsi"/> (GSIs 16-19, the first pins above the ISA
/// IRQs, free on this platform); a device's pin reaches wire (device + pin - 1) mod 4, the swizzle
/// of the PCI-to-PCI Bridge Architecture 1.2 §9.1 that boards use on a root bus too (INTA# of
/// device 0 on PIRQ A, of device 1 on PIRQ B, ...). The DSDT's _PRT must state the same table and
/// the interrupts are level-triggered, active-low (PCI Local Bus 3.0 §2.2.6; ACPI 6.x §6.2.13: a
/// _PRT entry naming a GSI is level, active-low).
///
/// The wires are shared and open-drain: a wire is asserted while any function on it asserts its
/// pin (a wired-OR), and, active-low, it drives its IOAPIC input LOW when asserted and HIGH when
/// idle (the IOAPIC model sees electrical levels; the guest programs these pins with polarity
/// "active low"). <see cref="Line"/> hands each function its own input to the wire.
/// </summary>
public sealed class PciInterruptRouting
{
    public const uint FirstGsi = 16;
    public const int Wires = 4;
    public const uint LastGsi = FirstGsi + Wires - 1;

    private readonly IInterruptLine[] _pins;
    private readonly HashSet<(int Device, PciInterruptPin Pin)>[] _asserted =
        [.. Enumerable.Range(0, Wires).Select(_ => new HashSet<(int, PciInterruptPin)>())];

    /// <param name="ioApicPin">the IOAPIC input of a GSI (16-19)</param>
    public PciInterruptRouting(Func<uint, IInterruptLine> ioApicPin)
    {
        _pins = [.. Enumerable.Range(0, Wires).Select(w => ioApicPin(FirstGsi + (uint)w))];
        foreach (var pin in _pins) pin.Assert(); // idle: pulled up
    }

    /// <summary>The GSI that pin <paramref name="pin"/> of <paramref name="device"/> (0-31) on bus 0
    /// reaches, or null for no pin.</summary>
    public static uint? Gsi(int device, PciInterruptPin pin) =>
        pin is >= PciInterruptPin.IntA and <= PciInterruptPin.IntD ? FirstGsi + (uint)((device + (int)pin - 1) & (Wires - 1)) : null;

    /// <summary>The input of <paramref name="device"/>'s <paramref name="pin"/> to its wire: Assert
    /// pulls the wire low, Deassert releases it (the wire stays low while another function holds it),
    /// Pulse does both.</summary>
    public IInterruptLine Line(int device, PciInterruptPin pin)
    {
        if (Gsi(device, pin) is not { } gsi) return NullInterruptLine.Instance;
        var wire = (int)(gsi - FirstGsi);
        return new LevelInput(level => Drive(wire, (device, pin), level));
    }

    /// <summary>Whether wire (GSI) <paramref name="gsi"/> is asserted (held low by some function).</summary>
    public bool IsAsserted(uint gsi) => gsi is >= FirstGsi and <= LastGsi && _asserted[gsi - FirstGsi].Count > 0;

    private void Drive(int wire, (int, PciInterruptPin) source, bool level)
    {
        var holders = _asserted[wire];
        var before = holders.Count > 0;
        if (level) holders.Add(source);
        else holders.Remove(source);
        var after = holders.Count > 0;
        if (before == after) return;
        if (after) _pins[wire].Deassert(); // asserted: driven low
        else _pins[wire].Assert();         // released: pulled up
    }
}
