namespace ActorVmm.Devices;

/// <summary>Snapshot of an <see cref="AcpiPm"/>. The timer is not in it: it is the VM clock's.</summary>
/// <param name="Enable">PM1_EN</param>
/// <param name="Control">PM1_CNT's stored bits (BM_RLD, SLP_TYP)</param>
/// <param name="TimerStatusClearedAt">the timer count (unwrapped) when TMR_STS was last cleared</param>
public sealed record AcpiPmState(ushort Enable, ushort Control, ulong TimerStatusClearedAt);

/// <summary>
/// The ACPI fixed-hardware register block of the PC (ACPI 6.x §4.8), one device over
/// <see cref="Length"/> bytes of I/O space (see <see cref="Platform.AcpiPmBase"/>):
/// <code>
/// offset 0  PM1_STS  16 bits  §4.8.3.1.1, write 1 to clear
/// offset 2  PM1_EN   16 bits  §4.8.3.1.2
/// offset 4  PM1_CNT  16 bits  §4.8.3.2.1 (offsets 6-7: reserved, read 0)
/// offset 8  PM_TMR   32 bits  §4.8.3.3, read-only
/// </code>
/// Accesses of 1, 2 or 4 bytes at any offset inside the block read or write the bytes they cover.
/// <list type="bullet">
/// <item>The PM timer counts at 3.579545 MHz from the VM's clock (monotonic, zero when the VM was
/// built) in 24 bits (TMR_VAL_EXT = 0 in the FADT); bits 31:24 read 0. Writes are ignored.
/// A read allocates nothing: it is a loop's body in a guest timing itself.</item>
/// <item>TMR_STS (PM1_STS bit 0) is set whenever the timer's bit 23 changes and stays set until
/// the guest writes 1 to it; it is computed from the clock when read. No SCI is raised for it,
/// nor for anything else: this block's SCI line is not wired (the FADT names IRQ 9 for an OS to
/// find, and the MADT states its polarity and trigger). TMR_EN and the other enable bits are
/// kept and read back.</item>
/// <item>No other status bit is ever set here: no power or sleep button (the FADT says so), no
/// RTC alarm wake, no bus master, no wake from sleep.</item>
/// <item>SCI_EN (PM1_CNT bit 0) always reads 1: the FADT's SMI_CMD is 0 (no SMM, §5.2.9), so there
/// is no legacy mode to leave and the machine is always in ACPI mode. SLP_EN (bit 13) is write-only and reads 0; GBL_RLS (bit 2) is
/// write-only (no SMI handler to tell) and reads 0.</item>
/// <item>A write with SLP_EN set and SLP_TYP = <see cref="SleepTypeS5"/> (the DSDT's \_S5 value)
/// powers the machine off (<see cref="IPlatformEvents.RequestPowerOff"/>). Other sleep types
/// (S1-S4) are not supported and the write only stores SLP_TYP: the guest keeps running.</item>
/// </list>
/// </summary>
public sealed class AcpiPm(IDeviceClock clock, IPlatformEvents events) : IStatefulDevice
{
    public const ulong Length = 12;
    public const ulong StatusOffset = 0;
    public const ulong EnableOffset = 2;
    public const ulong ControlOffset = 4;
    public const ulong TimerOffset = 8;

    /// <summary>3.579545 MHz (ACPI §4.8.3.3).</summary>
    public const long TimerFrequencyHz = 3_579_545;
    public const uint TimerMask = 0x00FF_FFFF;

    /// <summary>SLP_TYP of S5 (soft off), as Intel's ICH chipsets encode it (PM1_CNT SLP_TYP 111b);
    /// the DSDT's \_S5 object gives it to the OS.</summary>
    public const byte SleepTypeS5 = 7;

    // PM1_STS bits (§4.8.3.1.1).
    public const ushort TimerStatus = 0b0000_0000_0000_0001;

    // PM1_EN bits (§4.8.3.1.2): TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN, RTC_EN, PCIEXP_WAKE_DIS.
    private const ushort EnableBits = 0b0100_0111_0010_0001;

    // PM1_CNT bits (§4.8.3.2.1).
    public const ushort SciEnable = 0b0000_0000_0000_0001;
    public const ushort BusMasterReload = 0b0000_0000_0000_0010;
    public const ushort SleepTypeMask = 0b0001_1100_0000_0000;
    public const int SleepTypeShift = 10;
    public const ushort SleepEnable = 0b0010_0000_0000_0000;
    private const ushort ControlStored = BusMasterReload | SleepTypeMask;

    private ushort _enable;
    private ushort _control;
    private ulong _timerStatusClearedAt;

    public ulong Read(ulong offset, int size)
    {
        if (offset >= Length || size is < 1 or > 8) return ulong.MaxValue;
        // The timer only when the access covers it: a status poll costs no clock read.
        var timer = offset + (ulong)size > TimerOffset ? TimerValue() : 0;
        ulong value = 0;
        for (var i = 0; i < size; i++)
        {
            var at = offset + (ulong)i;
            var b = at < Length ? ByteAt(at, timer) : (byte)0xFF;
            value |= (ulong)b << (8 * i);
        }
        return value;
    }

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset >= Length || size is < 1 or > 8) return;
        var end = Math.Min(offset + (ulong)size, Length);
        // Each register gets the bytes of the write that fall in it, with a mask of which ones.
        if (offset < EnableOffset)
        {
            var (bits, mask) = Slice(offset, end, value, StatusOffset);
            if ((bits & mask & TimerStatus) != 0) _timerStatusClearedAt = Count();
        }
        if (offset < ControlOffset && end > EnableOffset)
        {
            var (bits, mask) = Slice(offset, end, value, EnableOffset);
            _enable = (ushort)((_enable & ~mask) | (bits & mask & EnableBits));
        }
        if (offset < ControlOffset + 2 && end > ControlOffset)
        {
            var (bits, mask) = Slice(offset, end, value, ControlOffset);
            _control = (ushort)((_control & ~(mask & ControlStored)) | (bits & mask & ControlStored));
            if ((bits & mask & SleepEnable) != 0 && SleepType == SleepTypeS5)
                events.RequestPowerOff($"ACPI S5: PM1a_CNT SLP_TYP {SleepTypeS5} with SLP_EN");
        }
        // PM_TMR is read-only; offsets 6-7 are reserved.
    }

    /// <summary>SLP_TYP as last written.</summary>
    public int SleepType => (_control & SleepTypeMask) >> SleepTypeShift;

    /// <summary>The timer as the guest reads it: 24 bits of the count.</summary>
    public uint TimerValue() => (uint)Count() & TimerMask;

    object IStatefulDevice.SaveState() => State();

    public AcpiPmState State() => new(_enable, _control, _timerStatusClearedAt);

    public static AcpiPm FromState(AcpiPmState state, IDeviceClock clock, IPlatformEvents events) => new(clock, events)
    {
        _enable = (ushort)(state.Enable & EnableBits),
        _control = (ushort)(state.Control & ControlStored),
        _timerStatusClearedAt = state.TimerStatusClearedAt,
    };

    /// <summary>Timer periods since the clock's zero, unwrapped: whole seconds and the rest apart,
    /// so the product fits 64 bits for any uptime.</summary>
    private ulong Count()
    {
        var ticks = (ulong)Math.Max(0, clock.Now.Ticks);
        var seconds = ticks / TimeSpan.TicksPerSecond;
        var rest = ticks % TimeSpan.TicksPerSecond;
        return seconds * TimerFrequencyHz + rest * TimerFrequencyHz / TimeSpan.TicksPerSecond;
    }

    /// <summary>TMR_STS: bit 23 of the count changed since the guest last cleared it.</summary>
    private bool TimerStatusSet() => (Count() >> 23) != (_timerStatusClearedAt >> 23);

    private byte ByteAt(ulong at, uint timer) => at switch
    {
        StatusOffset => (byte)(TimerStatusSet() ? TimerStatus : 0),
        StatusOffset + 1 => 0,
        EnableOffset => (byte)_enable,
        EnableOffset + 1 => (byte)(_enable >> 8),
        ControlOffset => (byte)(_control | SciEnable),
        ControlOffset + 1 => (byte)(_control >> 8),
        >= TimerOffset => (byte)(timer >> (int)(8 * (at - TimerOffset))),
        _ => 0, // reserved (6-7)
    };

    /// <summary>The bytes [offset, end) of a write, placed in a 16-bit register at <paramref name="register"/>,
    /// with a mask of the bytes they cover.</summary>
    private static (int Bits, int Mask) Slice(ulong offset, ulong end, ulong value, ulong register)
    {
        int bits = 0, mask = 0;
        for (var at = Math.Max(offset, register); at < Math.Min(end, register + 2); at++)
        {
            var shift = (int)(8 * (at - register));
            bits |= (int)((value >> (int)(8 * (at - offset))) & 0xFF) << shift;
            mask |= 0xFF << shift;
        }
        return (bits, mask);
    }
}
