namespace ActorVmm.Devices;

/// <summary>Snapshot of a <see cref="ResetControl"/>: its SYS_RST and FULL_RST bits.</summary>
public sealed record ResetControlState(byte Value);

/// <summary>
/// The reset control register at I/O port 0xCF9 (Intel's ICH/PCH datasheets: "RST_CNT — Reset
/// Control Register", I/O CF9h; the ACPI FADT's RESET_REG here): one byte, byte access only (the
/// other bytes of 0xCF8-0xCFF belong to PCI configuration mechanism #1).
/// <list type="bullet">
/// <item>Bit 2 (RST_CPU): writing it 1 resets the machine (<see cref="IPlatformEvents.RequestReset"/>);
/// guests write 0x06 (hard reset) or 0x0E (full reset). The chipset acts on its 0→1 transition
/// and the reset returns the register to its default; the bit is therefore never seen set
/// here: every write with it is a transition, and it reads 0.</item>
/// <item>Bit 1 (SYS_RST, hard/soft) and bit 3 (FULL_RST) read back what was written; every kind
/// of reset ends the VM the same way (exit code 8), so they choose nothing here.</item>
/// <item>Bits 0 and 7:4 are reserved and read 0.</item>
/// </list>
/// Other sizes or offsets: writes are dropped, reads return all ones, as from an unassigned port.
/// </summary>
public sealed class ResetControl(IPlatformEvents events) : IStatefulDevice
{
    public const ulong Length = 1;

    public const byte SystemReset = 0b0000_0010;
    public const byte ResetCpu = 0b0000_0100;
    public const byte FullReset = 0b0000_1000;
    private const byte Kept = SystemReset | FullReset;

    private byte _value;

    public ulong Read(ulong offset, int size) => offset == 0 && size == 1 ? _value : ulong.MaxValue;

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset != 0 || size != 1) return;
        _value = (byte)(value & Kept);
        if ((value & ResetCpu) != 0) events.RequestReset($"reset control 0x{(byte)value:X2} to port 0xCF9");
    }

    object IStatefulDevice.SaveState() => State();

    public ResetControlState State() => new(_value);

    public static ResetControl FromState(ResetControlState state, IPlatformEvents events) =>
        new(events) { _value = (byte)(state.Value & Kept) };
}
