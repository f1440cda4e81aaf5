namespace ActorVmm.Devices;

/// <summary>Snapshot of a <see cref="SystemControlPortA"/>: its writable bits (reset, A20).</summary>
public sealed record SystemControlPortAState(byte Value);

/// <summary>
/// System Control Port A, I/O port 0x92 (the PS/2 "port 92"): one byte, byte access. Its bits
/// follow the SMSC LPC47B27x / FDC37B78x super I/O datasheets ("Port 92 Register", default 24h),
/// the part that implements the port on many PC boards:
/// <list type="bullet">
/// <item>Bit 0 (alternate system reset): a write that takes it from 0 to 1 resets the machine
/// (<see cref="IPlatformEvents.RequestReset"/>), as the i8042's reset line does. It keeps the value
/// written: "before another pulse can be generated, this bit must be written back to a 0" (the
/// usual sequence reads the port, clears bit 0, writes, sets bit 0, writes).</item>
/// <item>Bit 1 (ALT_A20) reads back what was written. A20 itself is never masked: KVM has no A20
/// gate, the guest always sees all its address lines.</item>
/// <item>Bits 7:2 are reserved and read fixed values: 1 in bits 5 and 2, 0 elsewhere (0x24).
/// QEMU's port92 returns the whole byte last written instead; Intel's ICH "Port 92" register
/// leaves bits 7:2 reserved. A guest that keeps what it read (read-modify-write) works with all three.</item>
/// </list>
/// Other access sizes are not this register's: writes are dropped and reads return all ones, as
/// from an unassigned port.
/// </summary>
public sealed class SystemControlPortA(IPlatformEvents events) : IStatefulDevice
{
    public const ulong Length = 1;

    public const byte AlternateReset = 0b0000_0001;
    public const byte A20Gate = 0b0000_0010;
    /// <summary>The reserved bits as they read: 5 and 2 set (the SMSC parts' default 24h).</summary>
    public const byte ReservedBits = 0b0010_0100;
    private const byte Writable = AlternateReset | A20Gate;

    private byte _value;

    public ulong Read(ulong offset, int size) => offset == 0 && size == 1 ? (byte)(ReservedBits | _value) : ulong.MaxValue;

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset != 0 || size != 1) return;
        var old = _value;
        _value = (byte)(value & Writable);
        if ((old & AlternateReset) == 0 && (_value & AlternateReset) != 0) events.RequestReset("port 0x92 fast reset");
    }

    object IStatefulDevice.SaveState() => State();

    public SystemControlPortAState State() => new(_value);

    public static SystemControlPortA FromState(SystemControlPortAState state, IPlatformEvents events) =>
        new(events) { _value = (byte)(state.Value & Writable) };
}
