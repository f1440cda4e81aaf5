namespace ActorVmm.Devices.Tests;

public sealed class I8042Tests
{
    private const ulong Data = 0, Command = 4;
    private const byte StatusOutputFull = 0x01, StatusSystemFlag = 0x04, StatusCommandLast = 0x08;

    private readonly RecordingEvents _events = new();
    private readonly I8042 _kbc;

    public I8042Tests() => _kbc = new I8042(_events);

    private byte Status() => (byte)_kbc.Read(Command, 1);

    [Fact]
    public void Status_after_reset_has_an_empty_output_buffer_and_the_system_flag()
    {
        var status = Status();

        Assert.Equal(0, status & StatusOutputFull);
        Assert.Equal(StatusSystemFlag, status & StatusSystemFlag);
        Assert.NotEqual(0xFF, status); // 0xFF would mean "no controller" to Linux
    }

    [Fact]
    public void Command_fe_pulses_the_reset_line()
    {
        _kbc.Write(Command, 1, 0xFE);

        Assert.Equal(["i8042 reset"], _events.Resets);
    }

    [Fact]
    public void Pulse_command_with_bit0_set_does_not_reset()
    {
        _kbc.Write(Command, 1, 0xFF);

        Assert.Empty(_events.Resets);
    }

    [Fact]
    public void Self_test_answers_55_through_the_output_buffer()
    {
        _kbc.Write(Command, 1, 0xAA);

        Assert.Equal(StatusOutputFull | StatusCommandLast, Status() & (StatusOutputFull | StatusCommandLast));
        Assert.Equal(0x55UL, _kbc.Read(Data, 1));
        Assert.Equal(0, Status() & StatusOutputFull);
    }

    [Fact]
    public void Command_byte_can_be_read_and_written()
    {
        _kbc.Write(Command, 1, 0x20);
        Assert.Equal(0x05UL, _kbc.Read(Data, 1));

        _kbc.Write(Command, 1, 0x60);
        _kbc.Write(Data, 1, 0x47);
        Assert.Equal(0, Status() & StatusOutputFull);

        _kbc.Write(Command, 1, 0x20);
        Assert.Equal(0x47UL, _kbc.Read(Data, 1));
    }

    [Fact]
    public void System_flag_follows_command_byte_bit_2()
    {
        _kbc.Write(Command, 1, 0x60);
        _kbc.Write(Data, 1, 0x01);

        Assert.Equal(0, Status() & StatusSystemFlag);
    }

    [Fact]
    public void Disable_and_enable_keyboard_toggle_command_byte_bit_4()
    {
        _kbc.Write(Command, 1, 0xAD);
        _kbc.Write(Command, 1, 0x20);
        Assert.Equal(0x15UL, _kbc.Read(Data, 1));

        _kbc.Write(Command, 1, 0xAE);
        _kbc.Write(Command, 1, 0x20);
        Assert.Equal(0x05UL, _kbc.Read(Data, 1));
    }

    [Fact]
    public void Writing_the_output_port_with_bit0_clear_resets()
    {
        _kbc.Write(Command, 1, 0xD1);
        Assert.Empty(_events.Resets);

        _kbc.Write(Data, 1, 0xFE);

        Assert.Equal(["i8042 reset"], _events.Resets);
    }

    [Fact]
    public void Writing_the_output_port_with_bit0_set_is_kept_and_does_not_reset()
    {
        _kbc.Write(Command, 1, 0xD1);
        _kbc.Write(Data, 1, 0xDD); // A20 off

        _kbc.Write(Command, 1, 0xD0);
        Assert.Equal(0xDDUL, _kbc.Read(Data, 1));
        Assert.Empty(_events.Resets);
    }

    [Fact]
    public void Data_write_without_a_pending_command_changes_nothing()
    {
        var before = _kbc.State();

        _kbc.Write(Data, 1, 0xF4); // a keyboard command; no keyboard attached

        Assert.Equal(before with { LastWriteWasCommand = false }, _kbc.State());
        Assert.Empty(_events.Resets);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    public void Unassigned_offsets_read_all_ones(int offset)
    {
        Assert.Equal(0xFFUL, _kbc.Read((ulong)offset, 1));
    }

    [Fact]
    public void State_round_trip_keeps_a_pending_command_and_the_output_buffer()
    {
        _kbc.Write(Command, 1, 0xAA);
        _kbc.Write(Command, 1, 0x60);

        var restored = I8042.FromState(_kbc.State(), _events);
        Assert.Equal(_kbc.State(), restored.State());

        restored.Write(Data, 1, 0x61);
        Assert.Equal(0x55UL, restored.Read(Data, 1));
        restored.Write(Command, 1, 0x20);
        Assert.Equal(0x61UL, restored.Read(Data, 1));
    }
}
