namespace ActorVmm.Devices.Tests;

/// <summary>The ACPI PM block (PM1 status/enable/control, PM timer), register by register, on a manual clock.</summary>
public sealed class AcpiPmTests
{
    private const ulong Status = AcpiPm.StatusOffset, Enable = AcpiPm.EnableOffset, Control = AcpiPm.ControlOffset, Timer = AcpiPm.TimerOffset;

    private readonly ManualClock _clock = new();
    private readonly RecordingEvents _events = new();
    private readonly AcpiPm _pm;

    public AcpiPmTests() => _pm = new AcpiPm(_clock, _events);

    /// <summary>Clock time of timer count <paramref name="count"/> (rounded up to the next 100 ns tick).</summary>
    private static TimeSpan At(long count) =>
        TimeSpan.FromTicks((count * TimeSpan.TicksPerSecond + AcpiPm.TimerFrequencyHz - 1) / AcpiPm.TimerFrequencyHz);

    [Fact]
    public void Timer_counts_at_3_579545_mhz_from_the_vm_clock()
    {
        Assert.Equal(0UL, _pm.Read(Timer, 4));

        _clock.Now = TimeSpan.FromSeconds(1);
        Assert.Equal(3_579_545UL, _pm.Read(Timer, 4));

        _clock.Now = TimeSpan.FromMilliseconds(1500);
        Assert.Equal(5_369_317UL, _pm.Read(Timer, 4)); // floor(1.5 × 3579545)
    }

    [Fact]
    public void Timer_wraps_at_24_bits_and_its_high_byte_reads_zero()
    {
        _clock.Now = At(0xFF_FFFF);
        Assert.Equal(0xFF_FFFFUL, _pm.Read(Timer, 4));

        _clock.Now = At(0x100_0005);
        Assert.Equal(5UL, _pm.Read(Timer, 4));
        Assert.Equal(0UL, _pm.Read(Timer + 3, 1));

        _clock.Now = TimeSpan.FromDays(400); // no overflow on long uptimes
        Assert.True(_pm.Read(Timer, 4) <= AcpiPm.TimerMask);
    }

    [Fact]
    public void Timer_reads_of_one_two_and_four_bytes_see_the_same_count()
    {
        _clock.Now = At(0x12_3456);

        Assert.Equal(0x12_3456UL, _pm.Read(Timer, 4));
        Assert.Equal(0x3456UL, _pm.Read(Timer, 2));
        Assert.Equal(0x12UL, _pm.Read(Timer + 2, 1));
        Assert.Equal(0x34UL, _pm.Read(Timer + 1, 1));
    }

    [Fact]
    public void Timer_ignores_writes()
    {
        _clock.Now = At(1000);
        _pm.Write(Timer, 4, 0);

        Assert.Equal(1000UL, _pm.Read(Timer, 4));
    }

    [Fact]
    public void Timer_read_allocates_nothing()
    {
        _clock.Now = At(77);
        _pm.Read(Timer, 4); // JIT first

        // A read that allocates allocates in every batch of 10 000. The runtime may allocate on this
        // thread once in a while as it recompiles the code (tiered JIT): a batch with none is the answer.
        var allocated = new List<long>();
        for (var batch = 0; batch < 5 && (allocated.Count == 0 || allocated[^1] != 0); batch++)
        {
            var before = GC.GetAllocatedBytesForCurrentThread();
            for (var i = 0; i < 10_000; i++)
            {
                _clock.Now += TimeSpan.FromTicks(3);
                _pm.Read(Timer, 4);
            }
            allocated.Add(GC.GetAllocatedBytesForCurrentThread() - before);
        }

        Assert.True(allocated[^1] == 0, $"bytes allocated by batches of 10 000 reads: {string.Join(", ", allocated)}");
    }

    [Fact]
    public void Tmr_sts_sets_when_bit_23_changes_and_clears_on_a_write_of_1()
    {
        _clock.Now = At(0x7F_FFFF);
        Assert.Equal(0UL, _pm.Read(Status, 2));

        _clock.Now = At(0x80_0000);
        Assert.Equal(AcpiPm.TimerStatus, (ushort)_pm.Read(Status, 2));

        _pm.Write(Status, 2, 0xFFFE); // writing 0 leaves it
        Assert.Equal(AcpiPm.TimerStatus, (ushort)_pm.Read(Status, 2));
        _pm.Write(Status, 2, AcpiPm.TimerStatus);
        Assert.Equal(0UL, _pm.Read(Status, 2));

        _clock.Now = At(0xFF_FFFF);
        Assert.Equal(0UL, _pm.Read(Status, 2));
        _clock.Now = At(0x100_0000); // bit 23 goes back to 0: also a change
        Assert.Equal(AcpiPm.TimerStatus, (ushort)_pm.Read(Status, 2));
    }

    [Fact]
    public void Enable_bits_read_back_and_undefined_ones_read_zero()
    {
        _pm.Write(Enable, 2, 0xFFFF);

        Assert.Equal(0b0100_0111_0010_0001UL, _pm.Read(Enable, 2));
        _pm.Write(Enable + 1, 1, 0x00); // a byte write changes only its byte
        Assert.Equal(0b0010_0001UL, _pm.Read(Enable, 2));
    }

    [Fact]
    public void Status_and_enable_read_as_one_dword_at_the_event_block()
    {
        _pm.Write(Enable, 2, 0x0001);
        _clock.Now = At(0x80_0000);

        Assert.Equal(0x0001_0001UL, _pm.Read(Status, 4));
    }

    [Fact]
    public void Sci_en_always_reads_1_and_slp_en_reads_0()
    {
        Assert.Equal(AcpiPm.SciEnable, (ushort)_pm.Read(Control, 2));

        _pm.Write(Control, 2, 0x0000);
        Assert.Equal(AcpiPm.SciEnable, (ushort)_pm.Read(Control, 2));

        _pm.Write(Control, 2, AcpiPm.SleepEnable | (3 << AcpiPm.SleepTypeShift) | AcpiPm.BusMasterReload);
        Assert.Equal(AcpiPm.SciEnable | AcpiPm.BusMasterReload | (3 << AcpiPm.SleepTypeShift), (int)_pm.Read(Control, 2));
        Assert.Empty(_events.PowerOffs); // S3 is not supported: nothing happens
    }

    [Fact]
    public void Slp_en_with_the_s5_type_powers_off()
    {
        _pm.Write(Control, 2, AcpiPm.SleepEnable | (AcpiPm.SleepTypeS5 << AcpiPm.SleepTypeShift) | AcpiPm.SciEnable);

        Assert.Equal(["ACPI S5: PM1a_CNT SLP_TYP 7 with SLP_EN"], _events.PowerOffs);
    }

    [Fact]
    public void Slp_en_with_the_s5_type_in_a_byte_write_to_the_high_byte_powers_off()
    {
        _pm.Write(Control + 1, 1, (AcpiPm.SleepEnable | (AcpiPm.SleepTypeS5 << AcpiPm.SleepTypeShift)) >> 8);

        Assert.Single(_events.PowerOffs);
    }

    [Fact]
    public void The_s5_type_without_slp_en_is_only_stored()
    {
        _pm.Write(Control, 2, AcpiPm.SleepTypeS5 << AcpiPm.SleepTypeShift);

        Assert.Empty(_events.PowerOffs);
        Assert.Equal(AcpiPm.SleepTypeS5, _pm.SleepType);
    }

    [Fact]
    public void Reserved_bytes_read_zero_and_accesses_past_the_block_read_all_ones()
    {
        Assert.Equal(0UL, _pm.Read(6, 2));
        Assert.Equal(ulong.MaxValue, _pm.Read(AcpiPm.Length, 1));
        Assert.Equal(0xFFFF_FF00UL, _pm.Read(AcpiPm.Length - 1, 4)); // the timer's high byte, then nothing
        _pm.Write(AcpiPm.Length, 4, ulong.MaxValue); // ignored
        Assert.Empty(_events.PowerOffs);
    }

    [Fact]
    public void State_round_trips_with_the_timer_still_on_the_clock()
    {
        _pm.Write(Enable, 2, 0x0021);
        _pm.Write(Control, 2, 3 << AcpiPm.SleepTypeShift);
        _clock.Now = At(0x80_0010);
        _pm.Write(Status, 2, AcpiPm.TimerStatus);

        var copy = AcpiPm.FromState(_pm.State(), _clock, _events);

        Assert.Equal(_pm.Read(0, 8), copy.Read(0, 8));
        Assert.Equal(0x80_0010UL, copy.Read(Timer, 4));
        Assert.Equal(0UL, copy.Read(Status, 2)); // TMR_STS stays cleared
    }
}
