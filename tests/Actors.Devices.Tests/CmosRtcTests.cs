namespace ActorVmm.Devices.Tests;

public sealed class CmosRtcTests
{
    private const byte Sec = 0x00, SecAlarm = 0x01, Min = 0x02, MinAlarm = 0x03, Hour = 0x04, HourAlarm = 0x05;
    private const byte Dow = 0x06, Day = 0x07, Mon = 0x08, Year = 0x09, A = 0x0A, B = 0x0B, C = 0x0C, D = 0x0D, Century = 0x32;

    private const byte BSet = 0x80, BPie = 0x40, BAie = 0x20, BUie = 0x10, BBinary = 0x04, B24 = 0x02;
    private const byte CIrqf = 0x80, CPf = 0x40, CAf = 0x20, CUf = 0x10;

    /// <summary>Tuesday 5 March 2024, 13:45:30.5.</summary>
    private static readonly DateTime Wall = new DateTime(2024, 3, 5, 13, 45, 30).AddMilliseconds(500);

    private readonly ManualClock _clock = new();
    private readonly CountingInterruptLine _irq = new();
    private CmosRtc _rtc;

    public CmosRtcTests() => _rtc = new CmosRtc(() => Wall, _clock, _irq);

    private byte R(byte index)
    {
        _rtc.Write(CmosRtc.IndexOffset, 1, index);
        return (byte)_rtc.Read(CmosRtc.DataOffset, 1);
    }

    private void W(byte index, byte value)
    {
        _rtc.Write(CmosRtc.IndexOffset, 1, index);
        _rtc.Write(CmosRtc.DataOffset, 1, value);
    }

    private byte[] Time() => [R(Sec), R(Min), R(Hour), R(Dow), R(Day), R(Mon), R(Year), R(Century)];

    /// <summary>Plays actor and guest: runs from deadline to deadline until <paramref name="end"/>,
    /// reading register C (the guest's handler) whenever the line is up; returns how often it was.</summary>
    private int RunHandlingInterrupts(TimeSpan end)
    {
        var interrupts = 0;
        for (var guard = 0; guard < 1_000_000 && _rtc.NextDeadline is { } deadline && deadline <= end; guard++)
        {
            _clock.Now = deadline;
            _rtc.OnDeadline();
            if (!_irq.Level) continue;
            interrupts++;
            R(C);
        }
        _clock.Now = end;
        return interrupts;
    }

    [Fact]
    public void Time_reads_in_bcd_and_24_hour_mode_after_power_on()
    {
        Assert.Equal(B24, R(B));
        Assert.Equal([0x30, 0x45, 0x13, 0x03, 0x05, 0x03, 0x24, 0x20], Time());
    }

    [Fact]
    public void Time_reads_in_binary_when_dm_is_set()
    {
        W(B, BBinary | B24);

        Assert.Equal([30, 45, 13, 3, 5, 3, 24, 20], Time());
    }

    [Theory]
    [InlineData(13, BBinary, 0x81)] // 1 PM, binary
    [InlineData(13, 0, 0x81)]       // 1 PM, BCD
    [InlineData(0, 0, 0x12)]        // midnight is 12 AM
    [InlineData(12, 0, 0x92)]       // noon is 12 PM
    [InlineData(23, 0, 0x91)]       // 11 PM, BCD
    [InlineData(23, BBinary, 0x8B)] // 11 PM, binary
    public void Hours_in_12_hour_mode_carry_pm_in_bit_7(int hour, byte format, byte expected)
    {
        _rtc = new CmosRtc(() => new DateTime(2024, 3, 5, hour, 15, 0), _clock, _irq);

        W(B, format);

        Assert.Equal(expected, R(Hour));
    }

    [Fact]
    public void Time_advances_with_the_device_clock()
    {
        _clock.Advance(TimeSpan.FromSeconds(30));

        Assert.Equal([0x00, 0x46, 0x13], Time()[..3]);
    }

    [Fact]
    public void Uip_is_set_in_the_244_microseconds_before_the_update()
    {
        _rtc = new CmosRtc(() => new DateTime(2024, 3, 5, 13, 45, 59).AddTicks(9_998_000), _clock, _irq); // .9998 s

        Assert.Equal(0xA6, R(A));
        Assert.Equal(0x59, R(Sec));

        _clock.Advance(TimeSpan.FromMilliseconds(1));
        Assert.Equal(0x26, R(A));
        Assert.Equal(0x00, R(Sec));
        Assert.Equal(0x46, R(Min));
    }

    [Fact]
    public void Update_interrupt_sets_irqf_and_reading_c_clears_it_and_drops_the_line()
    {
        W(B, BUie | B24);
        Assert.Equal(TimeSpan.FromMilliseconds(500), _rtc.NextDeadline); // next second boundary

        _clock.Now = TimeSpan.FromMilliseconds(500);
        _rtc.OnDeadline();
        Assert.True(_irq.Level);
        Assert.Null(_rtc.NextDeadline); // nothing more can happen to the line before C is read

        Assert.Equal(CIrqf | CPf | CUf, R(C)); // PF runs at the default 1024 Hz whatever PIE says
        Assert.False(_irq.Level);
        Assert.Equal(0, R(C));
        Assert.Equal(TimeSpan.FromMilliseconds(1500), _rtc.NextDeadline);
    }

    [Fact]
    public void Periodic_interrupt_at_rate_6_comes_1024_times_a_simulated_second()
    {
        W(A, 0x26);
        W(B, BPie | B24);

        var interrupts = RunHandlingInterrupts(TimeSpan.FromSeconds(1));

        Assert.InRange(interrupts, 1022, 1026);
    }

    [Fact]
    public void Periodic_flag_is_set_without_pie_but_raises_no_interrupt()
    {
        _clock.Advance(TimeSpan.FromMilliseconds(2));

        Assert.Equal(CPf, R(C) & CPf);
        Assert.Equal(0, _irq.AssertCalls);
        Assert.Null(_rtc.NextDeadline);
    }

    [Fact]
    public void Alarm_fires_once_when_the_time_matches()
    {
        W(SecAlarm, 0x33);
        W(MinAlarm, 0x45);
        W(HourAlarm, 0x13);
        W(B, BAie | B24);

        var interrupts = new List<(TimeSpan At, byte C)>();
        for (var guard = 0; guard < 100 && _rtc.NextDeadline is { } deadline && deadline <= TimeSpan.FromSeconds(10); guard++)
        {
            _clock.Now = deadline;
            _rtc.OnDeadline();
            if (_irq.Level) interrupts.Add((_clock.Now, R(C)));
        }

        var (at, c) = Assert.Single(interrupts);
        Assert.Equal(TimeSpan.FromMilliseconds(2500), at); // 13:45:33.0
        Assert.Equal(CIrqf | CAf, c & (CIrqf | CAf));
        Assert.Equal(TimeSpan.FromDays(1) + TimeSpan.FromMilliseconds(2500), _rtc.NextDeadline); // tomorrow
    }

    [Fact]
    public void Alarm_with_dont_care_bytes_fires_every_second()
    {
        W(SecAlarm, 0xC0);
        W(MinAlarm, 0xFF);
        W(HourAlarm, 0xC3);
        W(B, BAie | B24);

        Assert.Equal(3, RunHandlingInterrupts(TimeSpan.FromSeconds(3)));
    }

    [Fact]
    public void Alarm_that_can_never_match_sets_no_deadline()
    {
        W(SecAlarm, 0x75); // not a second
        W(B, BAie | B24);

        Assert.Null(_rtc.NextDeadline);
    }

    [Fact]
    public void Guest_set_stops_the_clock_and_the_written_time_runs_after_set_clears()
    {
        W(B, BSet | B24);
        W(Hour, 0x08);
        W(Min, 0x09);
        W(Sec, 0x10);
        W(Day, 0x15);
        W(Mon, 0x06);
        W(Year, 0x30);
        W(Century, 0x20);
        _clock.Advance(TimeSpan.FromSeconds(5));
        Assert.Equal(0x10, R(Sec)); // stopped while SET
        Assert.Equal(0x26, R(A));   // no update in progress either

        W(B, B24);
        _clock.Advance(TimeSpan.FromSeconds(2));

        Assert.Equal([0x12, 0x09, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20], Time()); // Saturday 15 June 2030
    }

    [Fact]
    public void Setting_set_clears_uie()
    {
        W(B, BUie | B24);

        W(B, BSet | BUie | B24);

        Assert.Equal(BSet | B24, R(B));
    }

    [Fact]
    public void Write_to_a_running_clock_sets_that_field_at_once()
    {
        W(Min, 0x59);
        _clock.Advance(TimeSpan.FromSeconds(1));

        Assert.Equal([0x31, 0x59, 0x13], Time()[..3]);
    }

    [Fact]
    public void Invalid_time_written_by_the_guest_is_clamped_not_thrown()
    {
        W(B, BSet | B24);
        W(Mon, 0x13);
        W(Day, 0x45);
        W(Hour, 0xAA);
        W(B, B24);

        Assert.Equal(0x12, R(Mon));
        Assert.Equal(0x31, R(Day));
        Assert.Equal(0x23, R(Hour));
    }

    [Fact]
    public void Register_d_reports_valid_ram_and_time()
    {
        W(D, 0x00);

        Assert.Equal(0x80, R(D));
    }

    [Fact]
    public void Nmi_disable_bit_is_kept_in_the_index_register()
    {
        _rtc.Write(CmosRtc.IndexOffset, 1, 0x80 | D);

        Assert.True(_rtc.NmiDisabled);
        Assert.Equal(0x8DUL, _rtc.Read(CmosRtc.IndexOffset, 1));
        Assert.Equal(0x80UL, _rtc.Read(CmosRtc.DataOffset, 1)); // register D: bit 7 selects nothing

        _rtc.Write(CmosRtc.IndexOffset, 1, D);
        Assert.False(_rtc.NmiDisabled);
    }

    [Fact]
    public void Cmos_ram_bytes_beyond_0x0e_read_back()
    {
        for (var i = 0x0E; i < CmosRtc.Size; i++)
            if (i != Century) W((byte)i, (byte)(i ^ 0x5A));

        for (var i = 0x0E; i < CmosRtc.Size; i++)
            if (i != Century) Assert.Equal((byte)(i ^ 0x5A), R((byte)i));
    }

    [Fact]
    public void Host_can_preset_ram_but_not_clock_registers()
    {
        _rtc.SetRam(0x34, 0x12);

        Assert.Equal(0x12, R(0x34));
        Assert.Throws<ArgumentOutOfRangeException>(() => _rtc.SetRam(Sec, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => _rtc.SetRam(Century, 0));
    }

    [Fact]
    public void No_deadline_while_no_interrupt_is_enabled()
    {
        Assert.Null(_rtc.NextDeadline);
    }

    [Fact]
    public void State_round_trip_keeps_the_guest_time_running_from_the_new_wall_clock()
    {
        W(B, BSet | B24);
        W(Year, 0x30);
        W(B, B24);
        W(0x40, 0x99);
        var state = _rtc.State();

        var clock = new ManualClock { Now = TimeSpan.FromHours(7) };
        var restored = new Restored(CmosRtc.FromState(state, () => Wall.AddHours(1), clock, new CountingInterruptLine()));

        Assert.Equal(0x30, restored.R(Year));
        Assert.Equal(0x14, restored.R(Hour)); // an hour of host time went by
        Assert.Equal(0x99, restored.R(0x40));
        Assert.Equal(state.Cmos[B], restored.R(B));
    }

    private sealed class Restored(CmosRtc rtc)
    {
        public byte R(byte index)
        {
            rtc.Write(CmosRtc.IndexOffset, 1, index);
            return (byte)rtc.Read(CmosRtc.DataOffset, 1);
        }
    }
}
