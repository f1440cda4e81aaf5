namespace ActorVmm.Devices.Tests;

public sealed class DebugExitTests
{
    private readonly RecordingEvents _events = new();

    [Theory]
    [InlineData(0, 1)]
    [InlineData(1, 3)]
    [InlineData(2, 5)]
    [InlineData(3, 7)]
    public void Byte_write_requests_exit_with_status_v_shifted_left_or_one(int value, int status)
    {
        new DebugExit(_events).Write(0, 1, (ulong)value);

        Assert.Equal([(status, "debug-exit")], _events.Exits);
        Assert.Empty(_events.Resets);
    }

    [Fact]
    public void Byte_write_uses_the_low_byte_only()
    {
        new DebugExit(_events).Write(0, 1, 0x1_01);

        Assert.Equal(3, Assert.Single(_events.Exits).Status);
    }

    [Fact]
    public void Wider_write_uses_the_whole_value()
    {
        new DebugExit(_events).Write(0, 4, 0x1_01);

        Assert.Equal(0x203, Assert.Single(_events.Exits).Status);
    }

    [Fact]
    public void Reads_return_all_ones_and_request_nothing()
    {
        Assert.Equal(ulong.MaxValue, new DebugExit(_events).Read(0, 1));
        Assert.Empty(_events.Exits);
    }
}
