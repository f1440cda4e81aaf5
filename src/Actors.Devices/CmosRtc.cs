using System.Collections.Immutable;

namespace ActorVmm.Devices;

/// <summary>
/// Snapshot of a <see cref="CmosRtc"/>: the index register (NMI-disable bit included), the 128
/// CMOS bytes as stored (the time registers hold the guest's values while the clock is stopped
/// by SET; while it runs they are computed, and these bytes are not used), and the offset of the
/// RTC's time from the host's wall clock, so a restored RTC keeps the guest's time running.
/// Equality compares the bytes by content.
/// </summary>
public sealed record CmosRtcState(byte Index, ImmutableArray<byte> Cmos, TimeSpan Offset)
{
    public bool Equals(CmosRtcState? other) =>
        other is not null && Index == other.Index && Offset == other.Offset
        && Cmos.AsSpan().SequenceEqual(other.Cmos.AsSpan());

    public override int GetHashCode() => HashCode.Combine(Index, Offset, Cmos.Length);
}

/// <summary>
/// The PC's CMOS RAM and real-time clock (Motorola MC146818A datasheet, "DS" below; the same
/// registers in every PC chipset): offset 0 is the index port (0x70; bit 7 = NMI disable, kept
/// and readable), offset 1 the data port (0x71). 128 bytes: time registers 0x00–0x09 and the
/// century at 0x32, registers A–D at 0x0A–0x0D, RAM elsewhere.
///
/// The time is the host's wall clock, read once at construction, plus the elapsed time of the
/// <see cref="IDeviceClock"/>, plus an offset that a guest changes by setting the time. Values are
/// formatted per register B (DM: binary or BCD; 24/12: in 12-hour mode bit 7 of the hours is PM).
/// The day of week is derived from the date (Sunday = 1). Flags in register C are computed from
/// the clock when needed (every access, every deadline): PF at the rate of register A whatever
/// PIE says, UF at every second boundary, AF when the time reaches the alarm (0xC0–0xFF in an
/// alarm byte matches anything). IRQF and the IRQ 8 line follow (flags AND enables); reading C
/// clears the flags and drops the line. While IRQF is set nothing more can happen to the line, so
/// <see cref="NextDeadline"/> is null until the guest reads C: an idle guest costs no timers.
///
/// Simplifications: UIP is set for the 244 µs before each second boundary (the time registers
/// change at the boundary, never mid-update); a stopped divider (DV not 0–2) or SET stops the time;
/// an invalid time written by the guest is clamped field by field when the clock restarts;
/// the sub-second phase survives SET and time writes. Single-threaded: driven by its actor.
/// </summary>
public sealed class CmosRtc : IStatefulDevice, ITimedDevice
{
    public const ulong Length = 2;
    public const ulong IndexOffset = 0;
    public const ulong DataOffset = 1;
    public const int Size = 128;

    // Register indexes.
    public const byte Seconds = 0x00;
    public const byte SecondsAlarm = 0x01;
    public const byte Minutes = 0x02;
    public const byte MinutesAlarm = 0x03;
    public const byte Hours = 0x04;
    public const byte HoursAlarm = 0x05;
    public const byte DayOfWeek = 0x06;
    public const byte DayOfMonth = 0x07;
    public const byte Month = 0x08;
    public const byte Year = 0x09;
    public const byte RegisterA = 0x0A;
    public const byte RegisterB = 0x0B;
    public const byte RegisterC = 0x0C;
    public const byte RegisterD = 0x0D;
    public const byte Century = 0x32;

    private const byte IndexNmiDisable = 0b1000_0000;
    private const byte IndexMask = 0b0111_1111;

    // Register A.
    private const byte AUpdateInProgress = 0b1000_0000;
    private const byte ADivider = 0b0111_0000;
    private const byte ADividerMaxRunning = 0b0010_0000; // 32.768 kHz time base; higher values hold the chain in reset
    private const byte ARate = 0b0000_1111;

    // Register B.
    private const byte BSet = 0b1000_0000;
    private const byte BPeriodicEnable = 0b0100_0000;
    private const byte BAlarmEnable = 0b0010_0000;
    private const byte BUpdateEnable = 0b0001_0000;
    private const byte BBinary = 0b0000_0100;
    private const byte B24Hour = 0b0000_0010;

    // Register C.
    private const byte CIrqFlag = 0b1000_0000;
    private const byte CPeriodic = 0b0100_0000;
    private const byte CAlarm = 0b0010_0000;
    private const byte CUpdate = 0b0001_0000;
    private const byte CFlags = CPeriodic | CAlarm | CUpdate;

    private const byte DValidRam = 0b1000_0000; // VRT: the battery is good

    private const byte HourPm = 0b1000_0000;
    private const byte AlarmDontCare = 0b1100_0000;

    private const byte DefaultA = 0x26; // 32.768 kHz, 1024 Hz
    private const byte DefaultB = B24Hour;

    private const long TimeBaseHz = 32_768;

    /// <summary>DS: UIP goes high 244 µs before the update cycle.</summary>
    private static readonly TimeSpan UpdateWarning = TimeSpan.FromTicks(2_440);

    private static readonly byte[] TimeRegisters = [Seconds, Minutes, Hours, DayOfWeek, DayOfMonth, Month, Year, Century];

    private readonly IDeviceClock _clock;
    private readonly IInterruptLine _irq;
    private readonly DateTime _wallAtStart;
    private readonly TimeSpan _monoAtStart;
    private readonly TimeSpan _periodicOrigin;
    private readonly byte[] _cmos = new byte[Size];
    private byte _index;
    private TimeSpan _offset;
    private TimeSpan _processed;
    private bool _lineLevel;

    /// <param name="wallClock">the host's date and time (read once, here; its Kind is ignored)</param>
    /// <param name="clock">elapsed time from then on</param>
    /// <param name="irq8">the RTC's interrupt output, a level</param>
    public CmosRtc(Func<DateTime> wallClock, IDeviceClock clock, IInterruptLine irq8)
    {
        _clock = clock;
        _irq = irq8;
        _monoAtStart = clock.Now;
        _wallAtStart = Clamp(wallClock());
        _periodicOrigin = _monoAtStart;
        _processed = _monoAtStart;
        _cmos[RegisterA] = DefaultA;
        _cmos[RegisterB] = DefaultB;
        _cmos[RegisterD] = DValidRam;
    }

    /// <summary>Index port bit 7: the guest has masked NMIs.</summary>
    public bool NmiDisabled => (_index & IndexNmiDisable) != 0;

    /// <summary>Host-side setup of a RAM byte (firmware data such as memory sizes), 0x0E–0x7F except the century.</summary>
    public void SetRam(int index, byte value)
    {
        if (index is < RegisterD + 1 or >= Size || index == Century)
            throw new ArgumentOutOfRangeException(nameof(index), $"0x{index:X2} is not a CMOS RAM byte");
        _cmos[index] = value;
    }

    public ulong Read(ulong offset, int size)
    {
        switch (offset)
        {
            case IndexOffset:
                return _index;
            case DataOffset:
                var now = _clock.Now;
                Advance(now);
                return ReadRegister(_index & IndexMask, now);
            default:
                return 0xFF;
        }
    }

    public void Write(ulong offset, int size, ulong value)
    {
        switch (offset)
        {
            case IndexOffset:
                _index = (byte)value;
                break;
            case DataOffset:
                var now = _clock.Now;
                Advance(now);
                WriteRegister(_index & IndexMask, (byte)value, now);
                break;
        }
    }

    /// <summary>The next moment a flag with its enable bit set can rise, after the last one computed.</summary>
    public TimeSpan? NextDeadline
    {
        get
        {
            var b = _cmos[RegisterB];
            if ((_cmos[RegisterC] & CIrqFlag) != 0) return null; // the line is up until C is read
            TimeSpan? next = null;
            if ((b & BPeriodicEnable) != 0 && PeriodCycles() is > 0 and var period)
            {
                var cycle = (Cycles(_processed) / period + 1) * period;
                next = Min(next, _periodicOrigin + TimeOfCycle(cycle));
            }
            if (Running && (b & (BUpdateEnable | BAlarmEnable)) != 0)
            {
                var rtc = RtcAt(_processed);
                if ((b & BUpdateEnable) != 0) next = Min(next, MonoOf(WholeSecond(rtc).AddSeconds(1)));
                if ((b & BAlarmEnable) != 0 && NextAlarm(rtc) is { } alarm) next = Min(next, MonoOf(alarm));
            }
            return next;
        }
    }

    public void OnDeadline() => Advance(_clock.Now);

    object IStatefulDevice.SaveState() => State();

    /// <summary>The state at the clock's now: flags due by then are set (and the line driven) first.</summary>
    public CmosRtcState State()
    {
        var now = _clock.Now;
        Advance(now);
        var bytes = (byte[])_cmos.Clone();
        if (Running)
            foreach (var r in TimeRegisters) bytes[r] = FormatTime(r, RtcAt(now));
        return new CmosRtcState(_index, [.. bytes], _offset);
    }

    /// <summary>
    /// Rebuilds an RTC from a state record, after a crash of its actor or from a snapshot restored
    /// any time later on any host: the guest's time is the host wall clock read now
    /// (<paramref name="wallClock"/>) plus the saved offset, so the guest reads the host's current
    /// time again, moved by whatever it set (a guest keeping local time, or a deliberately wrong
    /// clock, keeps its difference); the time a snapshot was taken at plays no part. The jump is
    /// no update or alarm (as when the guest sets the time), the periodic phase restarts here.
    /// A clock stopped by SET (or a stopped divider) stays stopped at the time the guest wrote.
    /// Drives <paramref name="irq8"/> to the level register C implies.
    /// Throws <see cref="ArgumentException"/> unless the snapshot has 128 bytes.
    /// </summary>
    public static CmosRtc FromState(CmosRtcState state, Func<DateTime> wallClock, IDeviceClock clock, IInterruptLine irq8)
    {
        if (StateProblem(state) is { } problem) throw new ArgumentException(problem, nameof(state));
        var rtc = new CmosRtc(wallClock, clock, irq8)
        {
            _index = state.Index,
            _offset = state.Offset,
        };
        state.Cmos.CopyTo(rtc._cmos);
        rtc._cmos[RegisterA] &= unchecked((byte)~AUpdateInProgress);
        rtc._cmos[RegisterD] = DValidRam;
        rtc._lineLevel = (rtc._cmos[RegisterC] & CIrqFlag) != 0;
        if (rtc._lineLevel) irq8.Assert();
        else irq8.Deassert();
        return rtc;
    }

    /// <summary>What makes <paramref name="state"/> unusable for <see cref="FromState"/>, or null:
    /// anything but <see cref="Size"/> CMOS bytes.</summary>
    public static string? StateProblem(CmosRtcState state)
    {
        var length = state.Cmos.IsDefault ? 0 : state.Cmos.Length;
        return length != Size ? $"CMOS must have {Size} bytes, not {length}" : null;
    }

    private bool DividerRunning => (_cmos[RegisterA] & ADivider) <= ADividerMaxRunning;

    /// <summary>The time registers advance: the divider runs and SET is clear (DS register B bit 7).</summary>
    private bool Running => DividerRunning && (_cmos[RegisterB] & BSet) == 0;

    private bool Binary => (_cmos[RegisterB] & BBinary) != 0;
    private bool Hour24 => (_cmos[RegisterB] & B24Hour) != 0;

    private byte ReadRegister(int index, TimeSpan now)
    {
        switch (index)
        {
            case Seconds or Minutes or Hours or DayOfWeek or DayOfMonth or Month or Year or Century:
                return Running ? FormatTime(index, RtcAt(now)) : _cmos[index];
            case RegisterA:
                var uip = Running && RtcAt(now).TimeOfDay.Ticks % TimeSpan.TicksPerSecond >= TimeSpan.TicksPerSecond - UpdateWarning.Ticks;
                return (byte)(_cmos[RegisterA] | (uip ? AUpdateInProgress : 0));
            case RegisterC:
                // DS: reading C clears all its bits, and with IRQF the IRQ output.
                var c = _cmos[RegisterC];
                _cmos[RegisterC] = 0;
                UpdateLine();
                return c;
            case RegisterD:
                return DValidRam;
            default:
                return _cmos[index];
        }
    }

    private void WriteRegister(int index, byte value, TimeSpan now)
    {
        switch (index)
        {
            case Seconds or Minutes or Hours or DayOfWeek or DayOfMonth or Month or Year or Century:
                if (Running)
                {
                    // A write to a running clock sets the time at once, keeping the sub-second phase.
                    var rtc = RtcAt(now);
                    var raw = FormatAll(rtc);
                    raw[index] = value;
                    SetTime(raw, rtc, now);
                }
                else
                {
                    _cmos[index] = value;
                }
                break;
            case RegisterA:
                ChangeRunning(() => _cmos[RegisterA] = (byte)(value & ~AUpdateInProgress), now);
                break;
            case RegisterB:
                // DS: setting SET clears UIE.
                var b = (value & BSet) != 0 ? (byte)(value & ~BUpdateEnable) : value;
                ChangeRunning(() => _cmos[RegisterB] = b, now);
                UpdateLine();
                break;
            case RegisterC:
            case RegisterD:
                break; // read-only
            default:
                _cmos[index] = value;
                break;
        }
    }

    /// <summary>
    /// Applies a change of A or B. A clock that stops keeps its time in the registers, where the
    /// guest may write a new one; a clock that starts again runs from what the registers say.
    /// </summary>
    private void ChangeRunning(Action change, TimeSpan now)
    {
        var was = Running;
        var rtc = RtcAt(now);
        change();
        if (was && !Running)
        {
            foreach (var r in TimeRegisters) _cmos[r] = FormatTime(r, rtc);
        }
        else if (!was && Running)
        {
            SetTime(_cmos, rtc, now);
        }
    }

    /// <summary>Runs the clock from the time in <paramref name="raw"/>, keeping the phase of <paramref name="current"/>.</summary>
    private void SetTime(byte[] raw, DateTime current, TimeSpan now)
    {
        var phase = TimeSpan.FromTicks(current.Ticks % TimeSpan.TicksPerSecond);
        var time = Clamp(ParseTime(raw) + phase);
        _offset = time - HostAt(now);
        _processed = now; // the jump itself is no update or alarm
    }

    /// <summary>Computes the flags of register C up to <paramref name="now"/> and drives the line.</summary>
    private void Advance(TimeSpan now)
    {
        if (now <= _processed) return;
        var from = _processed;
        _processed = now;

        byte flags = 0;
        if (PeriodCycles() is > 0 and var period && Cycles(now) / period > Cycles(from) / period)
            flags |= CPeriodic;
        if (Running)
        {
            var a = RtcAt(from);
            var b = RtcAt(now);
            if (WholeSecond(b) > WholeSecond(a)) flags |= CUpdate;
            if (NextAlarm(a) is { } alarm && alarm <= b) flags |= CAlarm;
        }
        _cmos[RegisterC] |= flags;
        UpdateLine();
    }

    /// <summary>IRQF = (PF and PIE) or (AF and AIE) or (UF and UIE) (DS register C bit 7); the line follows IRQF.</summary>
    private void UpdateLine()
    {
        var c = (byte)(_cmos[RegisterC] & CFlags);
        var irqf = (c & _cmos[RegisterB] & CFlags) != 0;
        _cmos[RegisterC] = (byte)(c | (irqf ? CIrqFlag : 0));
        if (irqf == _lineLevel) return;
        _lineLevel = irqf;
        if (irqf) _irq.Assert();
        else _irq.Deassert();
    }

    /// <summary>
    /// Cycles of the 32.768 kHz time base per periodic interrupt (DS Table 5), 0 for none:
    /// rate 1 and 2 repeat 8 and 9; 3..15 give 2^(rate-1) cycles (8192 Hz .. 2 Hz).
    /// </summary>
    private long PeriodCycles()
    {
        if (!DividerRunning) return 0;
        var rate = _cmos[RegisterA] & ARate;
        return rate switch
        {
            0 => 0,
            1 or 2 => 1L << (rate + 6),
            _ => 1L << (rate - 1),
        };
    }

    private long Cycles(TimeSpan mono) => (long)((Int128)(mono - _periodicOrigin).Ticks * TimeBaseHz / TimeSpan.TicksPerSecond);

    private static TimeSpan TimeOfCycle(long cycle)
    {
        var scaled = (Int128)cycle * TimeSpan.TicksPerSecond;
        var ticks = scaled / TimeBaseHz;
        if (ticks * TimeBaseHz < scaled) ticks++;
        return TimeSpan.FromTicks((long)ticks);
    }

    private DateTime HostAt(TimeSpan mono) => _wallAtStart + (mono - _monoAtStart);

    private DateTime RtcAt(TimeSpan mono) => HostAt(mono) + _offset;

    /// <summary>The clock time at which the RTC shows <paramref name="rtc"/>.</summary>
    private TimeSpan MonoOf(DateTime rtc) => _monoAtStart + (rtc - _offset - _wallAtStart);

    /// <summary>The first whole second after <paramref name="after"/> that matches the alarm registers, or null if none can.</summary>
    private DateTime? NextAlarm(DateTime after)
    {
        var h = AlarmField(_cmos[HoursAlarm], hours: true);
        var m = AlarmField(_cmos[MinutesAlarm], hours: false);
        var s = AlarmField(_cmos[SecondsAlarm], hours: false);
        if (h > 23 || m > 59 || s > 59 || h < -1 || m < -1 || s < -1) return null;

        var t = WholeSecond(after).AddSeconds(1);
        for (var i = 0; i < 8; i++)
        {
            if (h >= 0 && t.Hour != h)
            {
                t = t.Hour < h ? t.Date.AddHours(h) : t.Date.AddDays(1).AddHours(h);
                continue;
            }
            var hour = t.Date.AddHours(t.Hour);
            if (m >= 0 && t.Minute != m)
            {
                t = t.Minute < m ? hour.AddMinutes(m) : hour.AddHours(1);
                continue;
            }
            var minute = hour.AddMinutes(t.Minute);
            if (s >= 0 && t.Second != s)
            {
                t = t.Second < s ? minute.AddSeconds(s) : minute.AddMinutes(1);
                continue;
            }
            return t;
        }
        return null;
    }

    /// <summary>An alarm byte as a number (24-hour for hours); -1 = don't care; -2 = can never match.</summary>
    private int AlarmField(byte value, bool hours)
    {
        if ((value & AlarmDontCare) == AlarmDontCare) return -1;
        if (!hours || Hour24) return Decode(value);
        var h = Decode((byte)(value & ~HourPm));
        if (h is < 1 or > 12) return -2;
        return h % 12 + ((value & HourPm) != 0 ? 12 : 0);
    }

    private byte FormatTime(int register, DateTime t)
    {
        switch (register)
        {
            case Seconds: return Encode(t.Second);
            case Minutes: return Encode(t.Minute);
            case Hours:
                if (Hour24) return Encode(t.Hour);
                var h12 = t.Hour % 12 == 0 ? 12 : t.Hour % 12;
                return (byte)(Encode(h12) | (t.Hour >= 12 ? HourPm : 0));
            case DayOfWeek: return Encode((int)t.DayOfWeek + 1);
            case DayOfMonth: return Encode(t.Day);
            case Month: return Encode(t.Month);
            case Year: return Encode(t.Year % 100);
            default: return Encode(t.Year / 100);
        }
    }

    private byte[] FormatAll(DateTime t)
    {
        var raw = new byte[Size];
        foreach (var r in TimeRegisters) raw[r] = FormatTime(r, t);
        return raw;
    }

    /// <summary>The time in the registers of <paramref name="raw"/>, each field clamped to its range.</summary>
    private DateTime ParseTime(byte[] raw)
    {
        int hour;
        if (Hour24)
        {
            hour = Decode(raw[Hours]);
        }
        else
        {
            hour = Decode((byte)(raw[Hours] & ~HourPm)) % 12 + ((raw[Hours] & HourPm) != 0 ? 12 : 0);
        }
        var year = Math.Clamp(Decode(raw[Century]) * 100 + Decode(raw[Year]), 1, 9998);
        var month = Math.Clamp(Decode(raw[Month]), 1, 12);
        var day = Math.Clamp(Decode(raw[DayOfMonth]), 1, DateTime.DaysInMonth(year, month));
        return new DateTime(year, month, day, Math.Clamp(hour, 0, 23), Math.Clamp(Decode(raw[Minutes]), 0, 59), Math.Clamp(Decode(raw[Seconds]), 0, 59));
    }

    private byte Encode(int value) => Binary ? (byte)value : (byte)(((value / 10) << 4) | (value % 10));

    /// <summary>A register value as a number; an invalid BCD digit gives a value out of every range.</summary>
    private int Decode(byte value)
    {
        if (Binary) return value;
        int tens = value >> 4, ones = value & 0x0F;
        return tens > 9 || ones > 9 ? 0xFF : tens * 10 + ones;
    }

    private static DateTime WholeSecond(DateTime t) => new(t.Ticks - t.Ticks % TimeSpan.TicksPerSecond);

    /// <summary>Keeps times where a year of uptime and a day of alarm search cannot overflow DateTime.</summary>
    private static DateTime Clamp(DateTime t)
    {
        var max = new DateTime(9998, 12, 31);
        return t > max ? max : t;
    }

    private static TimeSpan? Min(TimeSpan? a, TimeSpan b) => a is { } x && x < b ? x : b;
}
