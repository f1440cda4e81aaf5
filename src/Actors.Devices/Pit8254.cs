namespace ActorVmm.Devices;

/// <summary>
/// Snapshot of one 8254 counter. Times are relative to the moment of the snapshot, in input
/// clock ticks: <see cref="ElapsedTicks"/> since the count was loaded (or frozen, if
/// <see cref="Paused"/>), <see cref="PendingInTicks"/> until a count written in mode 2/3 takes
/// effect, <see cref="NextEdgeInTicks"/> until the next periodic interrupt edge.
/// <see cref="Count"/> is the count register, 1–65536; <see cref="LatchState"/> 0 = no latched
/// count, 1 = LSB left, 2 = MSB left, 3 = both.
/// </summary>
public sealed record PitChannelState(
    byte Mode,
    byte Access,
    bool Bcd,
    int Count,
    bool Armed,
    bool Gate,
    bool Triggered,
    long ElapsedTicks,
    bool Paused,
    int PendingCount,
    long PendingInTicks,
    bool WriteHigh,
    byte WriteLatch,
    bool ReadHigh,
    byte LatchState,
    ushort LatchedCount,
    bool StatusLatched,
    byte Status,
    bool EdgeSignalled,
    long NextEdgeInTicks);

/// <summary>Snapshot of a <see cref="Pit8254"/>; <see cref="SpeakerControl"/> holds port 0x61 bits 3:0.</summary>
public sealed record PitState(
    PitChannelState Channel0,
    PitChannelState Channel1,
    PitChannelState Channel2,
    byte SpeakerControl,
    bool Irq0Level);

/// <summary>
/// The 8254 programmable interval timer of a PC (Intel 8254 datasheet, "DS" below): counters 0–2
/// at offsets 0–2 and the control word register at offset 3 (ports 0x40–0x43), input clock
/// <see cref="InputHz"/>. Counter 0 drives IRQ 0; counter 1 (DRAM refresh) drives nothing;
/// counter 2's gate and output belong to port 0x61, the <see cref="SpeakerPort"/> view.
///
/// Counts and OUT levels are computed from the <see cref="IDeviceClock"/>, never by ticking: a
/// counter remembers the input-clock tick at which its count was loaded. All six modes count and
/// drive OUT as in DS; BCD counting is not supported (the bit is kept and reported, counting is
/// binary). Deviations, invisible to the usual drivers:
/// <list type="bullet">
/// <item>A count is loaded at the tick of the write, not at the next clock edge.</item>
/// <item>In mode 0, writing the first byte of a two-byte count does not stop counting.</item>
/// <item>IRQ 0 is driven as interrupts, not as the OUT waveform: modes 2 and 3 give one
/// <see cref="IInterruptLine.Pulse"/> per period (OUT's rising edge); modes 0 and 1 assert the
/// line at terminal count and keep it high until the counter is reprogrammed (OUT does the
/// same); modes 4 and 5 pulse once at terminal count. Reprogramming never makes an edge.</item>
/// <item>A late timer callback signals one edge for all the periods it missed (a PIC would merge
/// them in IRR anyway); the phase of later periods is kept.</item>
/// </list>
///
/// The PIT and port 0x61 are separate bus windows that may be served by separate actors, so every
/// entry point takes one lock; the IRQ line is told under it and must not call back.
/// </summary>
public sealed class Pit8254 : IStatefulDevice, ITimedDevice
{
    /// <summary>Input clock of every counter: 14.31818 MHz / 12.</summary>
    public const long InputHz = 1_193_182;

    public const ulong Length = 4;
    public const ulong ControlOffset = 3;

    // Control word (DS Figure 8).
    private const int SelectShift = 6;
    private const int ReadBackSelect = 0b11;
    private const int AccessShift = 4;
    private const int AccessLatch = 0b00;
    private const int AccessLsb = 0b01;
    private const int AccessMsb = 0b10;
    private const int AccessLsbMsb = 0b11;
    private const byte ControlBcd = 0b0000_0001;

    // Read-back command (DS Figure 9): bits are active low.
    private const byte ReadBackNoCount = 0b0010_0000;
    private const byte ReadBackNoStatus = 0b0001_0000;

    // Status byte (DS Figure 10).
    private const byte StatusOut = 0b1000_0000;
    private const byte StatusNullCount = 0b0100_0000;

    // Port 0x61 (system control port B).
    private const byte Port61Gate2 = 0b0000_0001;
    private const byte Port61Writable = 0b0000_1111; // gate 2, speaker data, parity/IOCHK check enables
    private const byte Port61Refresh = 0b0001_0000;
    private const byte Port61Out2 = 0b0010_0000;

    /// <summary>The refresh request bit toggles every 15.085 µs (counter 1 at its BIOS setting of 18).</summary>
    private const long RefreshHalfPeriodPicoseconds = 15_085_000;

    private readonly object _sync = new();
    private readonly IDeviceClock _clock;
    private readonly IInterruptLine _irq0;
    private readonly Channel[] _channels = [new(gate: true), new(gate: true), new(gate: false)];
    private byte _port61;
    private bool _irq0Level;

    public Pit8254(IDeviceClock clock, IInterruptLine irq0)
    {
        _clock = clock;
        _irq0 = irq0;
        SpeakerPort = new PitSpeakerPort(this);
    }

    /// <summary>Port 0x61 (offset 0, one byte): gate and output of counter 2.</summary>
    public PitSpeakerPort SpeakerPort { get; }

    /// <summary>Input clock ticks elapsed at clock time <paramref name="t"/>.</summary>
    public static long TicksAt(TimeSpan t) => (long)((Int128)t.Ticks * InputHz / TimeSpan.TicksPerSecond);

    /// <summary>The first clock time at which <see cref="TicksAt"/> reaches <paramref name="tick"/>.</summary>
    public static TimeSpan TimeOfTick(long tick)
    {
        var scaled = (Int128)tick * TimeSpan.TicksPerSecond;
        var ticks = scaled / InputHz;
        if (ticks * InputHz < scaled) ticks++;
        return TimeSpan.FromTicks((long)ticks);
    }

    public ulong Read(ulong offset, int size)
    {
        lock (_sync)
        {
            var t = Now();
            Sync(t);
            return offset < ControlOffset ? ReadCounter(_channels[offset], t) : 0xFFUL; // the control word is write-only
        }
    }

    public void Write(ulong offset, int size, ulong value)
    {
        lock (_sync)
        {
            var t = Now();
            Sync(t);
            var b = (byte)value;
            if (offset < ControlOffset) WriteCounter((int)offset, b, t);
            else if (offset == ControlOffset) WriteControl(b, t);
        }
    }

    public TimeSpan? NextDeadline
    {
        get
        {
            lock (_sync)
            {
                var edge = NextEdge(_channels[0]);
                return edge is { } tick ? TimeOfTick(tick) : null;
            }
        }
    }

    public void OnDeadline()
    {
        lock (_sync) Sync(Now());
    }

    object IStatefulDevice.SaveState() => State();

    /// <summary>The state at the clock's now: edges due by then are signalled first.</summary>
    public PitState State()
    {
        lock (_sync)
        {
            var t = Now();
            Sync(t);
            return new PitState(_channels[0].State(t), _channels[1].State(t), _channels[2].State(t), _port61, _irq0Level);
        }
    }

    /// <summary>Rebuilds a PIT from a snapshot, relative to <paramref name="clock"/>'s now; drives IRQ 0 to the saved level.</summary>
    public static Pit8254 FromState(PitState state, IDeviceClock clock, IInterruptLine irq0)
    {
        var pit = new Pit8254(clock, irq0);
        var t = pit.Now();
        pit._channels[0].Restore(state.Channel0, t);
        pit._channels[1].Restore(state.Channel1, t);
        pit._channels[2].Restore(state.Channel2, t);
        pit._port61 = (byte)(state.SpeakerControl & Port61Writable);
        pit._channels[2].Gate = (pit._port61 & Port61Gate2) != 0;
        pit._channels[0].Gate = pit._channels[1].Gate = true;
        pit._irq0Level = state.Irq0Level;
        if (state.Irq0Level) irq0.Assert();
        else irq0.Deassert();
        return pit;
    }

    internal byte ReadPort61()
    {
        lock (_sync)
        {
            var now = _clock.Now;
            var t = TicksAt(now);
            var refresh = (Int128)now.Ticks * 100_000 / RefreshHalfPeriodPicoseconds;
            return (byte)(_port61
                | ((refresh & 1) != 0 ? Port61Refresh : 0)
                | (Out(_channels[2], t) ? Port61Out2 : 0));
        }
    }

    internal void WritePort61(byte value)
    {
        lock (_sync)
        {
            _port61 = (byte)(value & Port61Writable);
            SetGate(_channels[2], (value & Port61Gate2) != 0, Now());
        }
    }

    private long Now() => TicksAt(_clock.Now);

    private static bool IsPeriodic(Channel c) => c.Mode is 2 or 3;

    /// <summary>Modes 1 and 5 start counting on a rising gate edge (hardware-triggered).</summary>
    private static bool IsGateTriggered(Channel c) => c.Mode is 1 or 5;

    /// <summary>Ticks counted since the count was loaded (DS: the counting element's progress).</summary>
    private static long Elapsed(Channel c, long t) => c.Paused ? c.Frozen : t - c.LoadTick;

    /// <summary>A count written in mode 2/3 while counting is loaded at the end of the period (DS mode 2).</summary>
    private static void ApplyPending(Channel c, long t)
    {
        if (c.PendingCount == 0 || c.Paused || t < c.PendingTick) return;
        c.Count = c.PendingCount;
        c.LoadTick = c.PendingTick;
        c.PendingCount = 0;
    }

    /// <summary>The OUT pin (DS "Mode Definitions").</summary>
    private static bool Out(Channel c, long t)
    {
        if (!c.Armed) return c.Mode != 0; // after a control word: low in mode 0, high otherwise
        ApplyPending(c, t);
        var d = Elapsed(c, t);
        var n = c.Count;
        return c.Mode switch
        {
            0 => d >= n,
            1 => !c.Triggered || d >= n,
            2 => !c.Gate || d % n != n - 1,
            3 => !c.Gate || d % n < (n + 1) / 2,
            4 => d != n,
            _ => !c.Triggered || d != n,
        };
    }

    /// <summary>The value in the counting element, as a read would return it.</summary>
    private static ushort CountAt(Channel c, long t)
    {
        if (!c.Armed) return (ushort)c.Count;
        ApplyPending(c, t);
        var d = Elapsed(c, t);
        var n = c.Count;
        return c.Mode switch
        {
            2 => (ushort)(n - d % n),
            3 => (ushort)(n - 2 * d % n), // decrements by two, twice per period (QEMU's approximation for odd counts)
            _ => (ushort)(n - d),
        };
    }

    /// <summary>The input tick of counter <paramref name="c"/>'s next interrupt edge, or null.</summary>
    private static long? NextEdge(Channel c)
    {
        if (!c.Armed || c.Paused) return null;
        if (IsPeriodic(c)) return c.NextEdgeTick;
        return c.EdgeSignalled ? null : c.LoadTick + c.Count;
    }

    /// <summary>Signals IRQ 0 edges that are due at tick <paramref name="t"/>; at most one per call.</summary>
    private void Sync(long t)
    {
        foreach (var c in _channels) ApplyPending(c, t);
        var ch0 = _channels[0];
        if (NextEdge(ch0) is not { } edge || edge > t) return;
        if (IsPeriodic(ch0))
        {
            _irq0.Pulse();
            ApplyPending(ch0, t);
            ch0.NextEdgeTick = ch0.LoadTick + ((t - ch0.LoadTick) / ch0.Count + 1) * ch0.Count;
        }
        else
        {
            ch0.EdgeSignalled = true;
            if (ch0.Mode is 0 or 1) SetIrq0(true);
            else _irq0.Pulse();
        }
    }

    private void SetIrq0(bool level)
    {
        if (level == _irq0Level) return;
        _irq0Level = level;
        if (level) _irq0.Assert();
        else _irq0.Deassert();
    }

    private void WriteControl(byte value, long t)
    {
        var select = value >> SelectShift;
        if (select == ReadBackSelect)
        {
            ReadBack(value, t);
            return;
        }

        var c = _channels[select];
        var access = (value >> AccessShift) & 0b11;
        if (access == AccessLatch)
        {
            LatchCount(c, t);
            return;
        }

        // DS: a control word resets the counter's logic; OUT goes to its initial state and the
        // counter waits for a new count.
        var mode = (value >> 1) & 0b111;
        c.Mode = (byte)(mode > 5 ? mode - 4 : mode); // 6 and 7 are modes 2 and 3
        c.Access = (byte)access;
        c.Bcd = (value & ControlBcd) != 0;
        c.Armed = false;
        c.Triggered = false;
        c.Paused = false;
        c.PendingCount = 0;
        c.WriteHigh = false;
        c.ReadHigh = false;
        c.LatchState = 0;
        c.StatusLatched = false;
        if (select == 0) SetIrq0(false);
    }

    /// <summary>Read-back command (DS Figure 9): latch count and/or status of the selected counters.</summary>
    private void ReadBack(byte value, long t)
    {
        for (var i = 0; i < 3; i++)
        {
            if ((value & (2 << i)) == 0) continue;
            var c = _channels[i];
            if ((value & ReadBackNoCount) == 0) LatchCount(c, t);
            if ((value & ReadBackNoStatus) == 0 && !c.StatusLatched)
            {
                // DS: a second status latch before the read is ignored.
                c.Status = (byte)((Out(c, t) ? StatusOut : 0)
                    | (!c.Armed || c.PendingCount != 0 ? StatusNullCount : 0)
                    | (c.Access << AccessShift)
                    | (c.Mode << 1)
                    | (c.Bcd ? ControlBcd : 0));
                c.StatusLatched = true;
            }
        }
    }

    /// <summary>Counter latch command: the count is held until read; a second latch is ignored (DS).</summary>
    private static void LatchCount(Channel c, long t)
    {
        if (c.LatchState != 0) return;
        c.LatchedCount = CountAt(c, t);
        c.LatchState = c.Access;
    }

    private static byte ReadCounter(Channel c, long t)
    {
        if (c.StatusLatched)
        {
            c.StatusLatched = false;
            return c.Status;
        }
        switch (c.LatchState)
        {
            case AccessLsb:
                c.LatchState = 0;
                return (byte)c.LatchedCount;
            case AccessMsb:
                c.LatchState = 0;
                return (byte)(c.LatchedCount >> 8);
            case AccessLsbMsb:
                c.LatchState = AccessMsb;
                return (byte)c.LatchedCount;
        }
        var count = CountAt(c, t);
        switch (c.Access)
        {
            case AccessLsb:
                return (byte)count;
            case AccessMsb:
                return (byte)(count >> 8);
            default:
                var high = c.ReadHigh;
                c.ReadHigh = !high;
                return high ? (byte)(count >> 8) : (byte)count;
        }
    }

    private void WriteCounter(int index, byte value, long t)
    {
        var c = _channels[index];
        switch (c.Access)
        {
            case AccessLsb:
                Load(index, value, t);
                break;
            case AccessMsb:
                Load(index, value << 8, t);
                break;
            case AccessLsbMsb when !c.WriteHigh:
                c.WriteLatch = value;
                c.WriteHigh = true;
                break;
            case AccessLsbMsb:
                c.WriteHigh = false;
                Load(index, c.WriteLatch | (value << 8), t);
                break;
        }
    }

    /// <summary>A complete count was written (DS "Mode Definitions", "new count" rules).</summary>
    private void Load(int index, int value, long t)
    {
        var c = _channels[index];
        var n = value == 0 ? 0x1_0000 : value; // 0 is the maximum count, 2^16
        if (IsPeriodic(c) && c.Armed && !c.Paused)
        {
            // Counting: the new count is loaded at the end of the current period.
            c.PendingCount = n;
            c.PendingTick = c.LoadTick + ((t - c.LoadTick) / c.Count + 1) * c.Count;
            return;
        }

        c.Count = n;
        c.Armed = true;
        c.PendingCount = 0;
        c.EdgeSignalled = false;
        c.Triggered = false;
        // Gate-triggered modes wait for a rising gate edge; the others count while the gate is high.
        if (IsGateTriggered(c) || !c.Gate) Pause(c, 0);
        else Start(c, t);
        if (index == 0) SetIrq0(false); // mode 0/1: OUT low until terminal count
    }

    private static void Start(Channel c, long t)
    {
        c.Paused = false;
        c.LoadTick = t;
        c.NextEdgeTick = t + c.Count;
    }

    private static void Pause(Channel c, long elapsed)
    {
        c.Paused = true;
        c.Frozen = elapsed;
    }

    /// <summary>DS Figure 13, "Gate Pin Operations Summary".</summary>
    private static void SetGate(Channel c, bool level, long t)
    {
        if (level == c.Gate) return;
        ApplyPending(c, t);
        c.Gate = level;
        if (!c.Armed) return;
        switch (c.Mode)
        {
            case 0:
            case 4:
                // Low disables counting; high enables it again where it stopped.
                if (!level) Pause(c, Elapsed(c, t));
                else
                {
                    c.Paused = false;
                    c.LoadTick = t - c.Frozen;
                }
                break;
            case 1:
            case 5:
                // A rising edge (re)triggers: the count is loaded and counting starts.
                if (level)
                {
                    c.Triggered = true;
                    c.EdgeSignalled = false;
                    Start(c, t);
                }
                break;
            default:
                // Modes 2 and 3: low stops counting and sets OUT high; a rising edge reloads.
                if (!level)
                {
                    Pause(c, Elapsed(c, t));
                }
                else
                {
                    if (c.PendingCount != 0) c.Count = c.PendingCount;
                    c.PendingCount = 0;
                    Start(c, t);
                }
                break;
        }
    }

    private sealed class Channel(bool gate)
    {
        public byte Mode;
        public byte Access = AccessLsbMsb;
        public bool Bcd;
        public int Count = 0x1_0000;
        public bool Armed;
        public bool Gate = gate;
        public bool Triggered;
        public long LoadTick;
        public bool Paused;
        public long Frozen;
        public int PendingCount;
        public long PendingTick;
        public bool WriteHigh;
        public byte WriteLatch;
        public bool ReadHigh;
        public int LatchState;
        public ushort LatchedCount;
        public bool StatusLatched;
        public byte Status;
        public bool EdgeSignalled;
        public long NextEdgeTick;

        public PitChannelState State(long t) => new(
            Mode, Access, Bcd, Count, Armed, Gate, Triggered, Elapsed(this, t), Paused, PendingCount,
            PendingTick - t, WriteHigh, WriteLatch, ReadHigh, (byte)LatchState, LatchedCount, StatusLatched,
            Status, EdgeSignalled, NextEdgeTick - t);

        public void Restore(PitChannelState s, long t)
        {
            Mode = (byte)(s.Mode <= 5 ? s.Mode : 0);
            Access = (byte)(s.Access is >= AccessLsb and <= AccessLsbMsb ? s.Access : AccessLsbMsb);
            Bcd = s.Bcd;
            Count = s.Count is >= 1 and <= 0x1_0000 ? s.Count : 0x1_0000;
            Armed = s.Armed;
            Gate = s.Gate;
            Triggered = s.Triggered;
            Paused = s.Paused;
            Frozen = s.ElapsedTicks;
            LoadTick = t - s.ElapsedTicks;
            PendingCount = s.PendingCount is >= 1 and <= 0x1_0000 ? s.PendingCount : 0;
            PendingTick = t + s.PendingInTicks;
            WriteHigh = s.WriteHigh;
            WriteLatch = s.WriteLatch;
            ReadHigh = s.ReadHigh;
            LatchState = s.LatchState <= AccessLsbMsb ? s.LatchState : 0;
            LatchedCount = s.LatchedCount;
            StatusLatched = s.StatusLatched;
            Status = s.Status;
            EdgeSignalled = s.EdgeSignalled;
            NextEdgeTick = t + s.NextEdgeInTicks;
        }
    }
}

/// <summary>
/// System control port B (port 0x61) as far as it belongs to the PIT: bit 0 = counter 2 gate,
/// bit 1 = speaker data (kept, no sound), bits 2–3 kept, bit 4 = refresh request toggle (every
/// 15.085 µs of clock time), bit 5 = counter 2 OUT. Offset 0, one byte. Shares the state of its
/// <see cref="Pit8254"/> (get it from <see cref="Pit8254.SpeakerPort"/>).
/// </summary>
public sealed class PitSpeakerPort : IBusDevice
{
    public const ulong Length = 1;

    private readonly Pit8254 _pit;

    internal PitSpeakerPort(Pit8254 pit) => _pit = pit;

    public ulong Read(ulong offset, int size) => offset == 0 ? _pit.ReadPort61() : 0xFFUL;

    public void Write(ulong offset, int size, ulong value)
    {
        if (offset == 0) _pit.WritePort61((byte)value);
    }
}
