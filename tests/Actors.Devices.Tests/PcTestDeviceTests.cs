namespace ActorVmm.Devices.Tests;

/// <summary>
/// QEMU's pc-testdev register map (hw/misc/pc-testdev.c) at register level: the scratch register
/// through both of its windows, the flush port, the interrupt-line block and the MMIO RAM.
/// </summary>
public sealed class PcTestDeviceTests
{
    private const ulong Scratch = PcTestDevice.ScratchWindow;
    private const ulong ByteScratch = PcTestDevice.ByteScratchWindow;
    private const ulong Flush = PcTestDevice.FlushWindow;
    private const ulong Irq = PcTestDevice.IrqWindow;
    private const ulong Iomem = PcTestDevice.IomemWindow;

    private readonly RecordingEvents _events = new();
    private readonly CountingInterruptLine[] _lines = [.. Enumerable.Range(0, PcTestDevice.Lines).Select(_ => new CountingInterruptLine())];
    private readonly PcTestDevice _device;

    public PcTestDeviceTests() => _device = new PcTestDevice(_events, _lines);

    // ---- scratch register ----

    [Fact]
    public void The_scratch_register_reads_back_a_32_bit_write_at_every_size_and_byte_offset()
    {
        _device.Write(Scratch, 4, 0x8765_4321);

        Assert.Equal(0x8765_4321UL, _device.Read(Scratch, 4));
        Assert.Equal(0x4321UL, _device.Read(Scratch, 2));
        Assert.Equal(0x8765UL, _device.Read(Scratch + 2, 2));
        Assert.Equal(new ulong[] { 0x21, 0x43, 0x65, 0x87 }, Enumerable.Range(0, 4).Select(i => _device.Read(Scratch + (ulong)i, 1)));
        Assert.Equal(0x6543UL, _device.Read(Scratch + 1, 2));
    }

    [Fact]
    public void A_narrow_write_replaces_only_the_bytes_it_covers()
    {
        _device.Write(Scratch, 4, 0x1122_3344);
        _device.Write(Scratch + 1, 1, 0xAA);
        _device.Write(Scratch + 2, 2, 0xBBCC);

        Assert.Equal(0xBBCC_AA44UL, _device.Read(Scratch, 4));
    }

    [Fact]
    public void The_byte_wide_window_is_the_same_register()
    {
        _device.Write(Scratch, 4, 0xDEAD_BEEF);
        Assert.Equal(0xDEAD_BEEFUL, _device.Read(ByteScratch, 4));
        Assert.Equal(0xADUL, _device.Read(ByteScratch + 2, 1));

        _device.Write(ByteScratch + 1, 2, 0x5566); // split into bytes at 0xE9 and 0xEA
        Assert.Equal(0xDE55_66EFUL, _device.Read(Scratch, 4));
    }

    [Fact]
    public void Bytes_of_an_access_past_the_register_are_dropped_and_read_all_ones()
    {
        _device.Write(Scratch, 4, 0x1122_3344);
        _device.Write(Scratch + 3, 2, 0xABCD); // 0xE3 and 0xE4: only 0xE3 is the register's

        Assert.Equal(0xCD22_3344UL, _device.Read(Scratch, 4));
        Assert.Equal(0xFFFF_CD22UL, _device.Read(Scratch + 2, 4));
        Assert.Empty(_events.PageFlushes);
    }

    // ---- flush port ----

    [Fact]
    public void A_32_bit_write_to_the_flush_port_asks_to_flush_the_page_holding_the_address()
    {
        _device.Write(Flush, 4, 0x0012_3456);

        Assert.Equal([0x0012_3000UL], _events.PageFlushes);
    }

    [Theory]
    [InlineData(0, 1)]
    [InlineData(0, 2)]
    [InlineData(0, 8)]
    [InlineData(1, 1)]
    [InlineData(2, 2)]
    public void The_flush_port_ignores_other_sizes_and_offsets(int offset, int size)
    {
        _device.Write(Flush + (ulong)offset, size, 0x4000);

        Assert.Empty(_events.PageFlushes);
    }

    [Fact]
    public void The_flush_port_takes_a_32_bit_address()
    {
        _device.Write(Flush, 4, 0xFFFF_FFFF_0000_5123);

        Assert.Equal([0x5000UL], _events.PageFlushes);
    }

    // ---- interrupt lines ----

    [Theory]
    [InlineData(0)]
    [InlineData(11)]
    [InlineData(15)]
    [InlineData(16)]
    [InlineData(23)]
    public void A_byte_write_sets_line_n_to_whether_the_byte_is_nonzero(int line)
    {
        _device.Write(Irq + (ulong)line, 1, 0x80);
        Assert.True(_lines[line].Level);
        Assert.Equal(1, _lines[line].AssertCalls);

        _device.Write(Irq + (ulong)line, 1, 0);
        Assert.False(_lines[line].Level);
        Assert.Equal(1, _lines[line].DeassertCalls);
        Assert.All(_lines.Where((_, i) => i != line), l => Assert.Equal(0, l.AssertCalls + l.DeassertCalls));
    }

    [Fact]
    public void Only_the_low_byte_of_a_byte_write_counts()
    {
        _device.Write(Irq + 5, 1, 0x100);

        Assert.False(_lines[5].Level);
        Assert.Equal(1, _lines[5].DeassertCalls);
    }

    [Fact]
    public void A_wider_write_drives_consecutive_lines_one_per_byte()
    {
        _device.Write(Irq + 11, 4, 1); // the real-mode suite's outl of 1 to port 0x200B

        Assert.True(_lines[11].Level);
        Assert.Equal([1, 1, 1], new[] { _lines[12], _lines[13], _lines[14] }.Select(l => l.DeassertCalls));
        Assert.Equal(0, _lines[15].AssertCalls + _lines[15].DeassertCalls);

        _device.Write(Irq + 22, 4, 0x0101_0101); // lines 22, 23; the rest is past the block
        Assert.True(_lines[22].Level && _lines[23].Level);
    }

    [Fact]
    public void The_line_block_and_the_flush_port_read_zero()
    {
        _device.Write(Irq + 3, 1, 1);

        Assert.Equal(0UL, _device.Read(Irq + 3, 1));
        Assert.Equal(0UL, _device.Read(Irq, 4));
        Assert.Equal(0UL, _device.Read(Flush, 4));
    }

    // ---- MMIO RAM ----

    [Theory]
    [InlineData(1, 0xA5UL)]
    [InlineData(2, 0xBEEFUL)]
    [InlineData(4, 0xDEAD_BEEFUL)]
    [InlineData(8, 0x0123_4567_89AB_CDEFUL)]
    public void The_mmio_ram_reads_back_what_was_written_at_each_size(int size, ulong value)
    {
        _device.Write(Iomem + 0x1230, size, value);

        Assert.Equal(value, _device.Read(Iomem + 0x1230, size));
    }

    [Fact]
    public void The_mmio_ram_is_little_endian_memory()
    {
        _device.Write(Iomem + 0x10, 8, 0x8877_6655_4433_2211);

        Assert.Equal(0x33UL, _device.Read(Iomem + 0x12, 1));
        Assert.Equal(0x7766_5544UL, _device.Read(Iomem + 0x13, 4)); // unaligned
        _device.Write(Iomem + 0x11, 2, 0xBBAA);
        Assert.Equal(0x8877_6655_44BB_AA11UL, _device.Read(Iomem + 0x10, 8));
    }

    [Fact]
    public void The_mmio_ram_starts_zeroed_and_covers_64k()
    {
        Assert.Equal(0UL, _device.Read(Iomem, 8));
        _device.Write(Iomem + 0xFFF8, 8, 0x1122_3344_5566_7788);
        Assert.Equal(0x1122_3344_5566_7788UL, _device.Read(Iomem + 0xFFF8, 8));
        Assert.Equal(0xFFFF_FFFF_1122_3344UL, _device.Read(Iomem + 0xFFFC, 8)); // past the end: all ones
    }

    [Fact]
    public void The_state_record_restores_the_scratch_register_and_the_mmio_ram()
    {
        _device.Write(Scratch, 4, 0xCAFE_F00D);
        _device.Write(Iomem + 0x4000, 8, 0x0102_0304_0506_0708);

        var restored = PcTestDevice.FromState(_device.State(), _events, _lines);

        Assert.Equal(_device.State(), restored.State());
        Assert.Equal(0xCAFE_F00DUL, restored.Read(ByteScratch, 4));
        Assert.Equal(0x0102_0304_0506_0708UL, restored.Read(Iomem + 0x4000, 8));
    }

    [Fact]
    public void Only_line_and_flush_writes_act_beyond_the_device()
    {
        Assert.True(PcTestDevice.ActsBeyondTheDevice(Flush));
        Assert.True(PcTestDevice.ActsBeyondTheDevice(Irq + 23));
        Assert.False(PcTestDevice.ActsBeyondTheDevice(Scratch));
        Assert.False(PcTestDevice.ActsBeyondTheDevice(ByteScratch + 3));
        Assert.False(PcTestDevice.ActsBeyondTheDevice(Iomem + Flush));
        Assert.False(PcTestDevice.ActsBeyondTheDevice(Iomem + Irq));
    }
}
