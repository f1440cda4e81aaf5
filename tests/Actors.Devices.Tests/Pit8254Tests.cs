namespace ActorVmm.Devices.Tests;

public sealed class Pit8254Tests
{
    private const ulong Counter0 = 0, Counter2 = 2, Control = 3;
    private const byte Port61Gate2 = 0x01, Port61Refresh = 0x10, Port61Out2 = 0x20;

    private readonly ManualClock _clock = new();
    private readonly CountingInterruptLine _irq0 = new();
    private readonly Pit8254 _pit;

    public Pit8254Tests() => _pit = new Pit8254(_clock, _irq0);

    private void W(ulong offset, byte value) => _pit.Write(offset, 1, value);
    private byte R(ulong offset) => (byte)_pit.Read(offset, 1);
    private byte Port61() => (byte)_pit.SpeakerPort.Read(0, 1);

    /// <summary>Control word (lobyte/hibyte access) then the count, low byte first.</summary>
    private void Program(int counter, int mode, int count)
    {
        W(Control, (byte)((counter << 6) | 0x30 | (mode << 1)));
        W((ulong)counter, (byte)count);
        W((ulong)counter, (byte)(count >> 8));
    }

    private void AdvanceTicks(long ticks) => _clock.Now = Pit8254.TimeOfTick(Pit8254.TicksAt(_clock.Now) + ticks);

    private ushort ReadCount(ulong counter) => (ushort)(R(counter) | (R(counter) << 8));

    /// <summary>Plays the actor: jumps the clock from deadline to deadline until <paramref name="end"/>.</summary>
    private void RunUntil(TimeSpan end)
    {
        for (var guard = 0; guard < 1_000_000 && _pit.NextDeadline is { } deadline && deadline <= end; guard++)
        {
            _clock.Now = deadline;
            _pit.OnDeadline();
        }
        _clock.Now = end;
        _pit.OnDeadline();
    }

    [Fact]
    public void Mode2_deadline_is_the_count_divided_by_the_input_clock_after_the_count_is_written()
    {
        _clock.Now = TimeSpan.FromMilliseconds(5);
        var start = Pit8254.TicksAt(_clock.Now);

        Program(0, mode: 2, count: 11932);

        var deadline = Assert.IsType<TimeSpan>(_pit.NextDeadline);
        Assert.Equal(Pit8254.TimeOfTick(start + 11932), deadline);
        // One period of 11932 input clocks, give or take the clock tick the write fell into.
        var period = 11932.0 / 1_193_182;
        Assert.InRange((deadline - _clock.Now).TotalSeconds, period - 1.0 / 1_193_182, period + 1e-7);
    }

    [Theory]
    [InlineData(2)]
    [InlineData(3)]
    public void Count_11932_raises_100_interrupts_in_a_simulated_second(int mode)
    {
        Program(0, mode, count: 11932);

        RunUntil(TimeSpan.FromSeconds(1));

        Assert.InRange(_irq0.PulseCalls, 99, 101);
        Assert.Equal(0, _irq0.AssertCalls);
    }

    [Fact]
    public void Mode2_interrupt_comes_exactly_at_the_end_of_each_period()
    {
        Program(0, mode: 2, count: 1000);

        AdvanceTicks(999);
        _pit.OnDeadline();
        Assert.Equal(0, _irq0.PulseCalls);

        AdvanceTicks(1);
        _pit.OnDeadline();
        Assert.Equal(1, _irq0.PulseCalls);
        Assert.Equal(Pit8254.TimeOfTick(2000), _pit.NextDeadline);
    }

    [Fact]
    public void Late_callback_signals_one_edge_and_keeps_the_phase()
    {
        Program(0, mode: 2, count: 1000);

        AdvanceTicks(10_500);
        _pit.OnDeadline();

        Assert.Equal(1, _irq0.PulseCalls);
        Assert.Equal(Pit8254.TimeOfTick(11_000), _pit.NextDeadline);
    }

    [Fact]
    public void Counter_latch_holds_the_count_while_the_clock_moves()
    {
        Program(0, mode: 2, count: 1000);
        AdvanceTicks(100);

        W(Control, 0x00); // latch counter 0
        AdvanceTicks(250);

        Assert.Equal(900, ReadCount(Counter0));
        Assert.Equal(650, ReadCount(Counter0)); // unlatched: live again
    }

    [Fact]
    public void Second_latch_before_the_read_is_ignored()
    {
        Program(0, mode: 2, count: 1000);
        AdvanceTicks(100);
        W(Control, 0x00);
        AdvanceTicks(100);
        W(Control, 0x00);

        Assert.Equal(900, ReadCount(Counter0));
    }

    [Fact]
    public void Lobyte_hibyte_access_writes_and_reads_low_byte_first()
    {
        Program(0, mode: 2, count: 0x1234);
        W(Control, 0x00);

        Assert.Equal(0x34, R(Counter0));
        Assert.Equal(0x12, R(Counter0));
        Assert.Equal(Pit8254.TimeOfTick(0x1234), _pit.NextDeadline);
    }

    [Fact]
    public void Lobyte_only_and_hibyte_only_access_load_one_byte_of_the_count()
    {
        W(Control, 0x14); // counter 0, LSB only, mode 2
        W(Counter0, 0x56);
        Assert.Equal(Pit8254.TimeOfTick(0x56), _pit.NextDeadline);
        Assert.Equal(0x56, R(Counter0));

        W(Control, 0x24); // counter 0, MSB only, mode 2
        W(Counter0, 0x02);
        Assert.Equal(Pit8254.TimeOfTick(0x200), _pit.NextDeadline);
        Assert.Equal(0x02, R(Counter0));
    }

    [Fact]
    public void Count_zero_means_65536()
    {
        Program(0, mode: 2, count: 0);

        Assert.Equal(Pit8254.TimeOfTick(0x1_0000), _pit.NextDeadline);
    }

    [Fact]
    public void Mode0_raises_irq0_once_at_terminal_count_and_keeps_counting_down()
    {
        Program(0, mode: 0, count: 1000);

        AdvanceTicks(999);
        _pit.OnDeadline();
        Assert.False(_irq0.Level);

        AdvanceTicks(1);
        _pit.OnDeadline();
        Assert.True(_irq0.Level);
        Assert.Null(_pit.NextDeadline);
        Assert.Equal(0, ReadCount(Counter0));

        AdvanceTicks(1);
        Assert.Equal(0xFFFF, ReadCount(Counter0)); // the counter wraps, OUT stays high
        AdvanceTicks(100_000);
        _pit.OnDeadline();
        Assert.Equal(1, _irq0.AssertCalls);
        Assert.Equal(0, _irq0.PulseCalls);

        W(Control, 0x30); // reprogramming mode 0 drops OUT
        Assert.False(_irq0.Level);
    }

    [Fact]
    public void Channel2_mode0_output_rises_after_the_count_only_while_gate_is_set()
    {
        W(Control, 0xB0); // counter 2, lobyte/hibyte, mode 0
        W(Counter2, 100);
        W(Counter2, 0);

        AdvanceTicks(500);
        Assert.Equal(0, Port61() & (Port61Out2 | Port61Gate2)); // gate off: not counting

        _pit.SpeakerPort.Write(0, 1, Port61Gate2);
        AdvanceTicks(99);
        Assert.Equal(Port61Gate2, Port61() & (Port61Out2 | Port61Gate2));

        AdvanceTicks(1);
        Assert.Equal(Port61Out2 | Port61Gate2, Port61() & (Port61Out2 | Port61Gate2));
        Assert.Equal(0, _irq0.AssertCalls + _irq0.PulseCalls); // counter 2 raises no interrupt
    }

    [Fact]
    public void Channel2_mode0_gate_low_pauses_the_count()
    {
        _pit.SpeakerPort.Write(0, 1, Port61Gate2);
        Program(2, mode: 0, count: 100);
        AdvanceTicks(40);

        _pit.SpeakerPort.Write(0, 1, 0);
        AdvanceTicks(1000);
        Assert.Equal(60, ReadCount(Counter2));

        _pit.SpeakerPort.Write(0, 1, Port61Gate2);
        AdvanceTicks(59);
        Assert.Equal(0, Port61() & Port61Out2);
        AdvanceTicks(1);
        Assert.Equal(Port61Out2, Port61() & Port61Out2);
    }

    [Fact]
    public void Channel2_mode3_output_is_a_square_wave_restarted_by_the_gate()
    {
        Program(2, mode: 3, count: 100);
        Assert.Equal(Port61Out2, Port61() & Port61Out2); // gate low: OUT high

        _pit.SpeakerPort.Write(0, 1, Port61Gate2 | 0x02); // gate and speaker data
        AdvanceTicks(49);
        Assert.Equal(Port61Out2, Port61() & Port61Out2);
        AdvanceTicks(1);
        Assert.Equal(0, Port61() & Port61Out2);
        AdvanceTicks(50);
        Assert.Equal(Port61Out2, Port61() & Port61Out2);
        Assert.Equal(0x03, Port61() & 0x0F); // gate and speaker bits read back
    }

    [Fact]
    public void Read_back_latches_status_with_out_access_and_mode()
    {
        Program(0, mode: 2, count: 1000);

        W(Control, 0xE2); // read-back: status only, counter 0

        Assert.Equal(0b1011_0100, R(Counter0)); // OUT high, lobyte/hibyte, mode 2
    }

    [Fact]
    public void Read_back_status_shows_null_count_until_a_count_is_written()
    {
        W(Control, 0x30); // counter 0, mode 0, no count yet

        W(Control, 0xE2);
        Assert.Equal(0b0111_0000, R(Counter0)); // OUT low, null count

        W(Counter0, 10);
        W(Counter0, 0);
        AdvanceTicks(10);
        W(Control, 0xE2);
        Assert.Equal(0b1011_0000, R(Counter0)); // terminal count reached: OUT high, count loaded
    }

    [Fact]
    public void Read_back_of_count_and_status_returns_status_first()
    {
        Program(2, mode: 2, count: 0x0203);
        W(Control, 0xC8); // read-back: count and status, counter 2

        Assert.Equal(0b1011_0100, R(Counter2));
        Assert.Equal(0x03, R(Counter2));
        Assert.Equal(0x02, R(Counter2));
    }

    [Fact]
    public void Mode2_count_written_while_counting_takes_effect_at_the_end_of_the_period()
    {
        Program(0, mode: 2, count: 1000);
        AdvanceTicks(300);

        W(Counter0, 500 & 0xFF);
        W(Counter0, 500 >> 8);

        Assert.Equal(Pit8254.TimeOfTick(1000), _pit.NextDeadline);
        AdvanceTicks(700);
        _pit.OnDeadline();
        Assert.Equal(1, _irq0.PulseCalls);
        Assert.Equal(Pit8254.TimeOfTick(1500), _pit.NextDeadline);
    }

    [Fact]
    public void Refresh_bit_toggles_every_15_microseconds()
    {
        var at0 = Port61() & Port61Refresh;
        _clock.Now = TimeSpan.FromMicroseconds(16);
        var at16 = Port61() & Port61Refresh;
        _clock.Now = TimeSpan.FromMicroseconds(31);
        var at31 = Port61() & Port61Refresh;

        Assert.Equal(0, at0);
        Assert.Equal(Port61Refresh, at16);
        Assert.Equal(0, at31);
    }

    [Fact]
    public void Reprogramming_counter0_to_periodic_does_not_make_an_edge()
    {
        Program(0, mode: 2, count: 1000);

        Program(0, mode: 3, count: 2000);

        Assert.Equal(0, _irq0.PulseCalls + _irq0.AssertCalls);
        Assert.Equal(Pit8254.TimeOfTick(2000), _pit.NextDeadline);
    }

    [Fact]
    public void State_round_trip_continues_the_count_on_a_new_clock()
    {
        Program(0, mode: 2, count: 1000);
        AdvanceTicks(300);
        var state = _pit.State();

        var clock = new ManualClock { Now = TimeSpan.FromSeconds(50) };
        var restored = Pit8254.FromState(state, clock, _irq0);

        Assert.Equal(700, (ushort)(restored.Read(Counter0, 1) | (restored.Read(Counter0, 1) << 8)));
        Assert.Equal(Pit8254.TimeOfTick(Pit8254.TicksAt(clock.Now) + 700), restored.NextDeadline);
    }
}
