namespace ActorVmm.Devices.Tests;

/// <summary>System Control Port A (0x92) and the reset control register (0xCF9), register by register.</summary>
public sealed class ResetPortTests
{
    private readonly RecordingEvents _events = new();

    [Fact]
    public void Port92_reads_its_reserved_bits_and_nothing_else_at_power_on()
    {
        var port = new SystemControlPortA(_events);

        Assert.Equal(0x24UL, port.Read(0, 1));
    }

    [Fact]
    public void Port92_bit1_reads_back_what_was_written_and_the_other_bits_stay_fixed()
    {
        var port = new SystemControlPortA(_events);

        port.Write(0, 1, 0xFE); // A20 on, every reserved bit written 1, no reset
        Assert.Equal(0x26UL, port.Read(0, 1));
        port.Write(0, 1, 0x00);
        Assert.Equal(0x24UL, port.Read(0, 1));
        Assert.Empty(_events.Resets);
    }

    [Fact]
    public void Port92_resets_when_bit0_goes_from_0_to_1_and_not_again_until_cleared()
    {
        var port = new SystemControlPortA(_events);

        port.Write(0, 1, 0x03);
        Assert.Equal(["port 0x92 fast reset"], _events.Resets);
        Assert.Equal(0x27UL, port.Read(0, 1)); // bit 0 keeps the value written

        port.Write(0, 1, 0x03); // still 1: no edge
        Assert.Single(_events.Resets);

        port.Write(0, 1, 0x02);
        port.Write(0, 1, 0x03);
        Assert.Equal(2, _events.Resets.Count);
    }

    [Fact]
    public void Port92_ignores_other_sizes_and_reads_them_as_an_unassigned_port()
    {
        var port = new SystemControlPortA(_events);

        port.Write(0, 2, 0x0003);
        port.Write(0, 4, 0x0003);

        Assert.Empty(_events.Resets);
        Assert.Equal(ulong.MaxValue, port.Read(0, 2));
        Assert.Equal(0x24UL, port.Read(0, 1));
    }

    [Fact]
    public void Port92_state_round_trips_without_a_spurious_reset()
    {
        var port = new SystemControlPortA(_events);
        port.Write(0, 1, 0x03);

        var copy = SystemControlPortA.FromState(port.State(), _events);
        copy.Write(0, 1, 0x03); // bit 0 was 1 already: no edge

        Assert.Equal(0x27UL, copy.Read(0, 1));
        Assert.Single(_events.Resets);
    }

    [Theory]
    [InlineData(0x06)] // hard reset: SYS_RST | RST_CPU
    [InlineData(0x0E)] // full reset: FULL_RST | SYS_RST | RST_CPU
    [InlineData(0x04)] // soft reset
    public void Cf9_resets_on_every_write_with_rst_cpu(byte value)
    {
        var rcr = new ResetControl(_events);

        rcr.Write(0, 1, value);

        Assert.Equal([$"reset control 0x{value:X2} to port 0xCF9"], _events.Resets);
    }

    [Fact]
    public void Cf9_keeps_sys_rst_and_full_rst_and_reads_rst_cpu_as_zero()
    {
        var rcr = new ResetControl(_events);
        Assert.Equal(0UL, rcr.Read(0, 1));

        rcr.Write(0, 1, 0xFB); // every bit but RST_CPU
        Assert.Equal(0x0AUL, rcr.Read(0, 1));
        Assert.Empty(_events.Resets);

        rcr.Write(0, 1, 0x02); // Linux writes SYS_RST first, then SYS_RST | RST_CPU
        Assert.Equal(0x02UL, rcr.Read(0, 1));
        rcr.Write(0, 1, 0x06);
        Assert.Single(_events.Resets);
        Assert.Equal(0x02UL, rcr.Read(0, 1));
    }

    [Fact]
    public void Cf9_answers_byte_accesses_only()
    {
        var rcr = new ResetControl(_events);

        rcr.Write(0, 2, 0x0606);
        rcr.Write(0, 4, 0x0606_0606);

        Assert.Empty(_events.Resets);
        Assert.Equal(ulong.MaxValue, rcr.Read(0, 2));
        Assert.Equal(0UL, rcr.Read(0, 1));
    }

    [Fact]
    public void Cf9_state_round_trips()
    {
        var rcr = new ResetControl(_events);
        rcr.Write(0, 1, 0x0A);

        Assert.Equal(0x0AUL, ResetControl.FromState(rcr.State(), _events).Read(0, 1));
    }
}
