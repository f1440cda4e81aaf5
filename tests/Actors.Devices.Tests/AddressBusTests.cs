namespace ActorVmm.Devices.Tests;

public sealed class AddressBusTests
{
    private static AddressBus<string> Bus() =>
        AddressBus<string>.Empty.Insert("uart", 0x3F8, 8).Insert("exit", 0xF4, 1).Insert("kbc", 0x60, 5);

    [Fact]
    public void Inserts_keep_every_range_sorted()
    {
        var bus = Bus();

        Assert.Equal(3, bus.Count);
        Assert.Equal(
            [(0x60UL, 5UL, "kbc"), (0xF4UL, 1UL, "exit"), (0x3F8UL, 8UL, "uart")],
            bus.Entries.ToArray());
    }

    [Theory]
    [InlineData(0x3F0, 9)]  // overlaps the start of 0x3F8..0x3FF
    [InlineData(0x3FF, 4)]  // overlaps the end
    [InlineData(0x3FA, 1)]  // inside
    [InlineData(0x3F0, 32)] // covers it
    public void Overlap_is_rejected_on_either_side(int @base, int length)
    {
        var e = Assert.Throws<BusException>(() => Bus().Insert("other", (ulong)@base, (ulong)length));
        Assert.Contains("other at 0x", e.Message);
        Assert.EndsWith("overlaps uart at 0x3F8-0x3FF", e.Message); // both named, for the user who wired them
    }

    [Fact]
    public void Adjacent_ranges_are_allowed()
    {
        var bus = Bus().Insert("below", 0x3F0, 8).Insert("above", 0x400, 1);

        Assert.True(bus.TryResolve(0x3F7, out var below, out _));
        Assert.Equal("below", below);
        Assert.True(bus.TryResolve(0x3F8, out var uart, out _));
        Assert.Equal("uart", uart);
        Assert.True(bus.TryResolve(0x400, out var above, out _));
        Assert.Equal("above", above);
    }

    [Fact]
    public void Empty_and_wrapping_ranges_are_rejected()
    {
        Assert.Throws<BusException>(() => Bus().Insert("empty", 0x1000, 0));
        Assert.Throws<BusException>(() => Bus().Insert("wrap", ulong.MaxValue, 2));
    }

    [Theory]
    [InlineData(0x3F8, "uart", 0)]
    [InlineData(0x3FD, "uart", 5)]
    [InlineData(0x64, "kbc", 4)]
    [InlineData(0xF4, "exit", 0)]
    public void Lookup_returns_the_device_and_the_offset(int address, string device, int offset)
    {
        Assert.True(Bus().TryResolve((ulong)address, out var found, out var off));
        Assert.Equal(device, found);
        Assert.Equal((ulong)offset, off);
    }

    [Theory]
    [InlineData(0x0)]
    [InlineData(0x5F)]
    [InlineData(0x65)]
    [InlineData(0x3F7)]
    [InlineData(0x400)]
    public void Miss_returns_false(int address)
    {
        Assert.False(Bus().TryResolve((ulong)address, out _, out _));
        Assert.False(AddressBus<string>.Empty.TryResolve((ulong)address, out _, out _));
    }

    [Fact]
    public void Remove_takes_out_the_range_starting_at_a_base_and_nothing_else()
    {
        var bus = AddressBus<string>.Empty.Insert("a", 0x100, 0x10).Insert("b", 0x200, 0x10).Insert("c", 0x300, 0x10);

        var without = bus.Remove(0x200);

        Assert.Equal(["a", "c"], without.Entries.Select(e => e.Device));
        Assert.False(without.TryResolve(0x205, out _, out _));
        Assert.True(without.TryResolve(0x305, out var c, out var offset) && c == "c" && offset == 5);
        Assert.Same(bus, bus.Remove(0x205)); // no range starts there
        Assert.Equal("b", without.Insert("b", 0x200, 0x10).Entries.ElementAt(1).Device); // the place is free again
    }
}
