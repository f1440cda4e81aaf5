namespace ActorVmm.Devices;

/// <summary>
/// A model with interrupt inputs other actors drive (IOAPIC pins, 8259 IRQs): its actor turns
/// <see cref="DeviceProtocol.SetIrqLevel"/> / <see cref="DeviceProtocol.PulseIrq"/> into calls on
/// the line. Null: no such input (out of range, or the PIC's cascade IRQ 2); the message is dropped.
/// </summary>
public interface IInterruptInputs
{
    IInterruptLine? Input(int line);
}

/// <summary>A model that retires level-triggered interrupts on a LAPIC's EOI (the IOAPIC's remote IRR).</summary>
public interface IEndOfInterrupt
{
    void EndOfInterrupt(byte vector);
}

/// <summary>A model answering the INTA cycle (the 8259 pair behind LINT0 / ExtINT).</summary>
public interface IInterruptAcknowledge
{
    /// <summary>The vector of the INTA, or null when the controller has none to give (not initialised).</summary>
    int? Acknowledge();

    /// <summary>The level of the INTR output after the acknowledge.</summary>
    bool InterruptRequested { get; }
}

/// <summary>
/// An <see cref="IInterruptLine"/> built from delegates: the host wires device IRQ outputs to
/// controller actors with it (each verb tells a message).
/// </summary>
public sealed class DelegateInterruptLine(Action assert, Action deassert, Action pulse) : IInterruptLine
{
    public void Assert() => assert();
    public void Deassert() => deassert();
    public void Pulse() => pulse();
}
