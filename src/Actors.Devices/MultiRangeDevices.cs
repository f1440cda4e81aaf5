namespace ActorVmm.Devices;

/// <summary>
/// The 8259 pair as ONE bus device owning three port ranges. The bus maps each range to its own
/// offset window (<see cref="MasterWindow"/>, <see cref="SlaveWindow"/>, <see cref="ElcrWindow"/>),
/// so one actor serves all three and the model's state has a single owner; the IRQ inputs arrive
/// as <see cref="DeviceProtocol.SetIrqLevel"/> messages (ISA IRQ n = input n; 2 is the cascade)
/// and the INTA as <see cref="DeviceProtocol.Acknowledge"/>.
/// </summary>
public sealed class PicDevice : IStatefulDevice, IInterruptInputs, IInterruptAcknowledge
{
    public const ulong MasterWindow = 0x000;
    public const ulong SlaveWindow = 0x100;
    public const ulong ElcrWindow = 0x200;
    private const ulong WindowMask = 0xFF;

    public PicDevice(IInterruptLine intr) : this(new Pic8259Pair(intr))
    {
    }

    private PicDevice(Pic8259Pair pair) => Pair = pair;

    public Pic8259Pair Pair { get; }

    public static PicDevice FromState(PicState state, IInterruptLine intr) => new(Pic8259Pair.FromState(state, intr));

    /// <summary>
    /// What a PC BIOS leaves behind (and what an OS that never touches the 8259 expects): both
    /// chips initialised (ICW1-4: edge, cascade, 8086 mode) with the BIOS vector bases 0x08 and
    /// 0x70, and every IRQ masked, so ISA IRQs reach the CPU only through the IOAPIC until the
    /// guest programs the PIC itself.
    /// </summary>
    public PicDevice InitialiseLikeBios()
    {
        ReadOnlySpan<(ulong Window, byte Base, byte Icw3)> chips = [(MasterWindow, 0x08, 0b0000_0100), (SlaveWindow, 0x70, 2)];
        foreach (var (window, vectorBase, icw3) in chips)
        {
            Write(window, 1, 0x11);       // ICW1: edge, cascade, ICW4 needed
            Write(window + 1, 1, vectorBase); // ICW2
            Write(window + 1, 1, icw3);   // ICW3
            Write(window + 1, 1, 0x01);   // ICW4: 8086 mode
            Write(window + 1, 1, 0xFF);   // OCW1: all masked
        }
        return this;
    }

    public ulong Read(ulong offset, int size) => View(offset, out var within) is { } v ? v.Read(within, size) : 0xFF;

    public void Write(ulong offset, int size, ulong value) => View(offset, out var within)?.Write(within, size, value);

    private IBusDevice? View(ulong offset, out ulong within)
    {
        within = offset & WindowMask;
        return (offset & ~WindowMask) switch
        {
            MasterWindow => Pair.Master,
            SlaveWindow => Pair.Slave,
            ElcrWindow => Pair.Elcr,
            _ => null,
        };
    }

    public object SaveState() => Pair.State();

    public IInterruptLine? Input(int line) => line is >= 0 and < 16 and not Pic8259Pair.CascadeIrq ? Pair.Irq(line) : null;

    public int? Acknowledge() => Pair.Acknowledge();

    public bool InterruptRequested => Pair.InterruptRequested;
}

/// <summary>
/// The 8254 PIT and port 0x61 as ONE bus device: counters/control at window <see cref="CounterWindow"/>,
/// port 0x61 at <see cref="SpeakerWindow"/>; timed through the wrapped model.
/// </summary>
public sealed class PitDevice(Pit8254 pit) : IStatefulDevice, ITimedDevice
{
    public const ulong CounterWindow = 0x000;
    public const ulong SpeakerWindow = 0x100;

    public Pit8254 Pit { get; } = pit;

    public ulong Read(ulong offset, int size) => offset >= SpeakerWindow
        ? Pit.SpeakerPort.Read(offset - SpeakerWindow, size)
        : Pit.Read(offset - CounterWindow, size);

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset >= SpeakerWindow) Pit.SpeakerPort.Write(offset - SpeakerWindow, size, value);
        else Pit.Write(offset - CounterWindow, size, value);
    }

    public object SaveState() => ((IStatefulDevice)Pit).SaveState();

    public TimeSpan? NextDeadline => Pit.NextDeadline;

    public void OnDeadline() => Pit.OnDeadline();
}
